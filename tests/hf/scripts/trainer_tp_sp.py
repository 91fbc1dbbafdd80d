"""An unchanged-style Hugging Face Trainer script for tensor and sequence parallelism (it imports no shardwise):
AutoTP comes from the DeepSpeed config (``"tensor_parallel": {"autotp_size": N}``), Ulysses from accelerate's
``ParallelismConfig(sp_size=N, sp_backend="deepspeed")`` passed as ``TrainingArguments.parallelism_config``. Trains a
tiny local Llama; rank 0 writes its per-step losses to ``--out``/result.json. Run under ``shardwise --num_gpus 2 ...
--deepspeed cfg`` or plainly (no ``--deepspeed``, no ``--sp``) as the single-process reference."""

import argparse
import json
import os

import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int, pad_tail: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.labels = self.ids.clone()
        if pad_tail:  # the last tokens are prompt/padding: no loss on them (-100), as in SFT data
            self.labels[:, seq - pad_tail:] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.norms: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            if logs.get("grad_norm") is not None:
                self.norms.append(float(logs["grad_norm"]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--gas", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--pad_tail", type=int, default=0)
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--save_model", action="store_true")
    a = p.parse_args()
    parallelism = None
    if a.sp > 1:
        from accelerate import ParallelismConfig
        from accelerate.utils import DeepSpeedSequenceParallelConfig

        handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation=a.attn)
        parallelism = ParallelismConfig(sp_size=a.sp, sp_backend="deepspeed", sp_handler=handler)
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.gas,
        max_steps=a.steps, learning_rate=1e-3, weight_decay=0.01, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], seed=7, deepspeed=a.deepspeed, save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0, parallelism_config=parallelism,
    )
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    seen: list[int] = []  # sequence lengths the model's forward got (a Ulysses rank sees its shard)
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(int(kwargs["input_ids"].shape[1])),
                                    with_kwargs=True)
    losses = Losses()
    trainer = Trainer(model=model, args=args, callbacks=[losses],
                      train_dataset=TokenDataset(64, a.seq, model.config.vocab_size, a.pad_tail))
    trainer.train()
    if a.save_model:
        trainer.save_model(os.path.join(a.out, "final"))
    if args.process_index == 0:
        info = {"losses": losses.losses, "norms": losses.norms, "world": args.world_size,
                "tp": trainer.get_tp_size(), "sp": trainer.get_sp_size(),
                "total_batch": trainer.get_total_train_batch_size(args),
                "seen_lengths": sorted(set(seen))}
        with open(os.path.join(a.out, "result.json"), "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    main()
