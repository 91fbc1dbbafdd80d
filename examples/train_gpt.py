"""Train a small GPT on bundled text with shardwise, exactly as a DeepSpeed script would.

    shardwise --num_gpus 2 examples/train_gpt.py --deepspeed_config examples/configs/zero1_fp32.json

The corpus is the project's own documentation, read as bytes (vocabulary 256), so nothing is downloaded. Swap
``import shardwise as deepspeed`` for ``import deepspeed`` and the script runs under DeepSpeed unchanged.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch
from torch.utils.data import Dataset

import shardwise as deepspeed
from shardwise.models import GPT, GPTConfig
from shardwise.utils import RepeatingLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ByteCorpus(Dataset):
    """Fixed-length windows of the repository's Markdown files, as bytes."""

    def __init__(self, block_size: int) -> None:
        files = sorted(glob.glob(os.path.join(ROOT, "*.md")) + glob.glob(os.path.join(ROOT, "docs", "*.md")))
        data = b"\n\n".join(open(f, "rb").read() for f in files) or bytes(range(256)) * 64
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.block_size = block_size

    def __len__(self) -> int:
        return max(1, (len(self.data) - 1) // self.block_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[i * self.block_size : (i + 1) * self.block_size + 1]
        if len(chunk) < self.block_size + 1:
            chunk = torch.cat([chunk, chunk.new_zeros(self.block_size + 1 - len(chunk))])
        return chunk[:-1], chunk[1:]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps to train")
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--save_dir", default=os.path.join(ROOT, "checkpoints", "train_gpt"))
    parser.add_argument("--seed", type=int, default=0)
    deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    deepspeed.init_distributed()
    cfg = GPTConfig(vocab_size=256, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd)
    model = GPT(cfg)
    engine, _, loader, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters(),
                                                training_data=ByteCorpus(args.block_size))
    if engine.global_rank == 0:
        print(f"GPT with {model.num_parameters():,} parameters; {engine}", flush=True)
    data = RepeatingLoader(loader)
    start = time.perf_counter()
    for _ in range(args.steps * engine.gradient_accumulation_steps()):
        x, y = next(data)
        loss = engine(x.to(engine.device), y.to(engine.device))
        engine.backward(loss)
        engine.step()
    elapsed = time.perf_counter() - start
    engine.save_checkpoint(args.save_dir, client_state={"steps": engine.global_steps})
    if engine.global_rank == 0:
        print(f"trained {engine.global_steps} steps in {elapsed:.1f} s; last loss {loss.item():.4f}; "
              f"checkpoint saved under {args.save_dir}", flush=True)


if __name__ == "__main__":
    main()
