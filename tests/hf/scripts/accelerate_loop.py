"""An unchanged-style Accelerate training loop (it imports no shardwise): prepare, backward, clip_grad_norm_,
save_state / load_state, get_state_dict. With ``--deepspeed cfg.json`` it uses accelerate's DeepSpeed plugin; without,
it is the single-process reference. Rank 0 writes ``--out``/result.json."""

import argparse
import json
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, set_seed
from transformers import LlamaForCausalLM


def batches(n: int, seq: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args()
    set_seed(7)
    plugin = DeepSpeedPlugin(hf_ds_config=a.deepspeed) if a.deepspeed else None
    # `accelerate launch --use_deepspeed` passes the plugin through the environment instead of --deepspeed
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if plugin is None and not launched_with_deepspeed:
        accelerator = Accelerator(cpu=True)
    else:
        # CPU-only machine: make the distributed state with cpu=True first (as Trainer's use_cpu=True does);
        # Accelerator(cpu=True, deepspeed_plugin=...) would silently drop DeepSpeed and run plain DDP.
        PartialState(cpu=True)
        accelerator = Accelerator(deepspeed_plugin=plugin)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    data = torch.utils.data.DataLoader(batches(32, 16, model.config.vocab_size), batch_size=a.batch, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    losses, norms, skipped = [], [], []
    state_dir = os.path.join(a.out, "state")

    def train_step(batch: dict) -> None:
        loss = model(**batch).loss
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.gather(loss.detach()[None]).mean().item())
        norms.append(float(norm) if norm is not None else None)
        skipped.append(bool(getattr(optimizer, "step_was_skipped", False)))

    it = iter(data)
    batch_list = [next(it) for _ in range(4)]
    for batch in batch_list[:2]:
        train_step(batch)
    accelerator.save_state(state_dir)
    for batch in batch_list[2:]:
        train_step(batch)
    state = accelerator.get_state_dict(model)
    accelerator.load_state(state_dir)
    for batch in batch_list[2:]:
        train_step(batch)
    if accelerator.is_main_process:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, os.path.join(a.out, "state_dict.pt"))
        with open(os.path.join(a.out, "result.json"), "w") as f:
            json.dump({"losses": losses, "norms": norms, "skipped": skipped, "world": accelerator.num_processes,
                       "engine": f"{type(model).__module__}.{type(model).__name__}"}, f)


if __name__ == "__main__":
    main()
