"""An unchanged-style Hugging Face Trainer script (it imports no shardwise): trains a tiny local Llama and writes
its per-step losses (rank 0) to ``--out``/losses.json. Run under ``shardwise --num_gpus 2 ... --deepspeed cfg``
or plainly (no ``--deepspeed``) as the single-process reference."""

import argparse
import json
import os

import torch
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import get_model_param_count


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class WarmupLRTrainer(Trainer):
    """Trainer with the lr sequence of DeepSpeed's WarmupLR (linear, min 0): optimizer step k (from 0) uses
    lr * min(1, max(0, k - 1) / N), since WarmupLR sets its first value at construction and again at its first
    step(). Lets a plain single-process run reproduce a DeepSpeed-scheduler run."""

    ds_warmup_steps = 0

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:
            n = self.ds_warmup_steps
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda k: min(1.0, max(0, k - 1) / n))
        return self.lr_scheduler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--gas", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr_scheduler_type", default="constant")
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--save_steps", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--save_model", action="store_true")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--ds_warmup_reference", type=int, default=0,
                   help="reference runs only: DeepSpeed WarmupLR's linear warmup over N steps (first two steps 0)")
    a = p.parse_args()
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch, gradient_accumulation_steps=a.gas,
        max_steps=a.steps, learning_rate=1e-3, weight_decay=0.01, lr_scheduler_type=a.lr_scheduler_type,
        warmup_steps=a.warmup_steps, logging_steps=1, report_to=[], seed=7, deepspeed=a.deepspeed,
        save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0, bf16=a.bf16,
    )
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    loaded = list(model.parameters())  # under ZeRO-3, from_pretrained builds them in zero.Init: ds_* set already
    zero_init = all(hasattr(p, "ds_id") and p.numel() == 0 for p in loaded) if a.deepspeed else False
    loaded_numel = sum(getattr(p, "ds_numel", p.numel()) for p in loaded)
    lora_counts = None
    if a.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(11)  # same adapters in every run (loading may draw from the RNG differently under ZeRO-3)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, init_lora_weights="gaussian"))
        lora_counts = list(model.get_nb_trainable_parameters())
    losses = Losses()
    trainer_class = WarmupLRTrainer if a.ds_warmup_reference else Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=TokenDataset(64, 16, model.config.vocab_size),
                            callbacks=[losses])
    trainer.ds_warmup_steps = a.ds_warmup_reference
    trainer.train(resume_from_checkpoint=a.resume)
    if a.save_model:
        trainer.save_model(os.path.join(a.out, "final"))
    if args.process_index == 0:
        info = {"losses": losses.losses, "world": args.world_size,
                "trainable": get_model_param_count(trainer.model, trainable_only=True),
                "zero_init": zero_init, "loaded_numel": loaded_numel, "lora_counts": lora_counts,
                "total": get_model_param_count(trainer.model, trainable_only=False)}
        with open(os.path.join(a.out, "result.json"), "w") as f:
            json.dump(info, f)


if __name__ == "__main__":
    main()
