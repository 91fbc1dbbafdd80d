"""LLaMA-style inference from a locally saved checkpoint, split over the launched ranks.

    shardwise --num_gpus 2 examples/llama_inference.py
    shardwise --num_gpus 2 examples/llama_inference.py --dtype bf16 --model_dir /path/to/a/llama/directory

``init_inference`` is given only the checkpoint directory (config.json + safetensors shards, as saved by
``save_pretrained``): it builds the model on the meta device from config.json, plans the split (grouped-query
attention: 8 query heads and 4 key/value heads here), and each rank reads only its slices of each shard. Any
Hugging Face LLaMA, Mistral or Qwen2 directory works the same way; without one, a small model is built and saved
under checkpoints/ (in several shards) on the first run.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from local_models import ROOT, ensure_model, share_cores

import shardwise as deepspeed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("--model_dir", default=os.path.join(ROOT, "checkpoints", "llama-tiny"))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--prompt", default="Tensor parallelism")
    parser.add_argument("--max_new_tokens", type=int, default=40)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if rank == 0:
        ensure_model("llama", args.model_dir, shard_size="300KB")  # several shards, read in order
    dist.barrier()

    from transformers import AutoTokenizer

    start = time.perf_counter()
    engine = deepspeed.init_inference(checkpoint=args.model_dir, tensor_parallel={"tp_size": world_size},
                                      dtype=args.dtype)
    load_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = engine(ids).logits  # full-vocabulary logits on every rank
    tokens = engine.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)

    stats = engine.load_stats
    line = (f"rank {rank}: read {stats.bytes_read / 2**20:.2f} of {stats.bytes_full / 2**20:.2f} MiB "
            f"({stats.files} files) in {load_s:.2f}s; holds "
            f"{sum(p.numel() * p.element_size() for p in engine.module.parameters()) / 2**20:.2f} MiB")
    lines = [None] * world_size
    dist.all_gather_object(lines, line)
    if rank == 0:
        attn = engine.module.model.layers[0].self_attn
        print(f"\nLLaMA split over {world_size} ranks ({args.dtype}): q_proj {tuple(attn.q_proj.weight.shape)}, "
              f"k_proj {tuple(attn.k_proj.weight.shape)} per rank; logits {tuple(logits.shape)}")
        print("\n".join(lines))
        print(f"\n{tokenizer.decode(tokens[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
