"""One rank of ``bench_hf_trainer.py``: a plain Hugging Face Trainer script (it imports no shardwise) training a
local Llama with ``--deepspeed cfg.json`` (shardwise or DeepSpeed, whichever ``import deepspeed`` gives) or
Trainer's FSDP2 path (``--fsdp``). Each rank writes ``--out``/rank<R>.json: per-step wall times, losses, peak RSS
and which implementation ran."""

import argparse
import json
import os
import resource
import time

import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1234))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Timer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    fsdp = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}} if a.fsdp else {}
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=1e-4,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], seed=7, deepspeed=a.deepspeed,
        save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **fsdp)
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    timer = Timer()
    trainer = Trainer(model=model, args=args, callbacks=[timer],
                      train_dataset=Tokens(a.batch * args.world_size * a.steps, a.seq, model.config.vocab_size))
    trainer.train()
    impl = "fsdp2" if a.fsdp else "?"
    if a.deepspeed:
        import deepspeed

        impl = f"{deepspeed.__name__} {getattr(deepspeed, '__version__', '?')} ({os.path.dirname(deepspeed.__file__)})"
    with open(os.path.join(a.out, f"rank{args.process_index}.json"), "w") as f:
        json.dump({"times": timer.times, "losses": timer.losses, "impl": impl,
                   "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


if __name__ == "__main__":
    main()
