"""An unchanged-style Accelerate training loop for tensor and sequence parallelism (it imports no shardwise):
AutoTP from the DeepSpeed config (``"tensor_parallel": {"autotp_size": N}``: ``deepspeed.initialize`` splits the
model), Ulysses from ``ParallelismConfig(sp_size=N, sp_backend="deepspeed")`` (``prepare`` registers it and wraps the
data loader). The loss under Ulysses is the token-weighted mean over the sequence group, each rank backpropagating
its own share (as Trainer does). Rank 0 writes ``--out``/result.json (and the full weights from ``get_state_dict``)."""

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
    labels = ids.clone()
    labels[:, seq - 5:] = -100
    return [{"input_ids": row, "labels": lab} for row, lab in zip(ids, labels)]


def sp_loss(model, batch: dict) -> torch.Tensor:
    from deepspeed.utils import groups

    shift_labels = batch["shift_labels"]
    loss = model(**batch, labels=shift_labels).loss
    good = (shift_labels != -100).sum()
    local = torch.where(good > 0, loss, 0.0) * good
    totals = torch.stack((local.detach(), good.float()))
    torch.distributed.all_reduce(totals, group=groups._get_sequence_parallel_group())
    return (local + (totals[0] - local.detach())) / totals[1].clamp(min=1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--sp", type=int, default=1)
    a = p.parse_args()
    set_seed(7)
    plugin = DeepSpeedPlugin(hf_ds_config=a.deepspeed) if a.deepspeed else None
    parallelism = None
    if a.sp > 1:
        from accelerate import ParallelismConfig

        parallelism = ParallelismConfig(sp_size=a.sp, sp_backend="deepspeed")
    # CPU-only machine: the distributed state must be made with cpu=True first (as Trainer's use_cpu=True does);
    # Accelerator(cpu=True) would turn DeepSpeed off, and a GPU-less Accelerator() finds no backend (1 process).
    PartialState(cpu=True)
    accelerator = Accelerator(deepspeed_plugin=plugin, parallelism_config=parallelism)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    seen: list[int] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(int(kwargs["input_ids"].shape[1])),
                                    with_kwargs=True)
    data = torch.utils.data.DataLoader(batches(16, 16, model.config.vocab_size), batch_size=a.batch, shuffle=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    model.train()
    losses, norms = [], []
    for step, batch in enumerate(data):
        if step == 4:
            break
        loss = sp_loss(model, batch) if a.sp > 1 else model(**batch).loss
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        norms.append(float(norm))
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, os.path.join(a.out, "state_dict.pt"))
        with open(os.path.join(a.out, "result.json"), "w") as f:
            json.dump({"losses": losses, "norms": norms, "world": accelerator.num_processes,
                       "seen_lengths": sorted(set(seen))}, f)


if __name__ == "__main__":
    main()
