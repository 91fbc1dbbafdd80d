"""BLOOM inference with tensor parallelism across ranks, written exactly as a DeepSpeed script.

    shardwise --num_gpus 2 examples/bloom_inference.py            # 2 ranks (CPU processes here, GPUs elsewhere)
    shardwise --num_gpus 2 examples/bloom_inference.py --dtype bf16 --batch_size 4

Like DeepSpeed's BLOOM reference script: the model is created on the meta device (no memory), a checkpoints JSON
lists the weight files, and ``init_inference`` gives each rank only its slices (``tensor_parallel`` = number of
ranks). Then a batch of prompts is completed twice, greedily and by sampling; every rank computes the same tokens,
which the script checks. The model (a small BLOOM-architecture model with a locally trained tokenizer) is built
and saved under checkpoints/ on the first run, since the Hugging Face hub is not needed. Swap the import for
``import deepspeed`` and the script runs under DeepSpeed unchanged.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import torch
import torch.distributed as dist
from local_models import ROOT, ensure_model, share_cores

import shardwise as deepspeed

PROMPTS = ["DeepSpeed users", "The pipeline engine", "Tensor parallelism splits", "A checkpoint is",
           "ZeRO stage 3", "The launcher starts", "Each rank reads", "shardwise is"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser.add_argument("--model_dir", default=os.path.join(ROOT, "checkpoints", "bloom-tiny"))
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    share_cores(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if rank == 0:
        ensure_model("bloom", args.model_dir)  # once, before the other ranks read it
    dist.barrier()

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    config = AutoConfig.from_pretrained(args.model_dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    # The model on the meta device: no weights are allocated until init_inference loads this rank's slices.
    with deepspeed.OnDevice(dtype=dtype, device="meta"):
        model = AutoModelForCausalLM.from_config(config)
    checkpoints_json = os.path.join(args.model_dir, "checkpoints.json")
    if rank == 0:
        files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(args.model_dir, "*.safetensors")))
        with open(checkpoints_json, "w") as f:
            json.dump({"type": "BLOOM", "checkpoints": files, "version": 1.0}, f)
    dist.barrier()

    start = time.perf_counter()
    model = deepspeed.init_inference(model, mp_size=world_size, base_dir=args.model_dir, dtype=dtype,
                                     checkpoint=checkpoints_json, replace_with_kernel_inject=True)
    load_s = time.perf_counter() - start

    batch = tokenizer(PROMPTS[: args.batch_size], return_tensors="pt", padding=True)
    common = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    greedy = model.generate(**batch, do_sample=False, **common)
    greedy_s = time.perf_counter() - start
    torch.manual_seed(1234)  # same seed everywhere (init_inference also synced the generators)
    sampled = model.generate(**batch, do_sample=True, top_k=40, temperature=0.8, **common)

    # every tensor-parallel rank computed the same tokens
    for name, tokens in (("greedy", greedy), ("sampled", sampled)):
        gathered = [torch.empty_like(tokens) for _ in range(world_size)]
        dist.all_gather(gathered, tokens)
        assert all(torch.equal(t, tokens) for t in gathered), f"ranks disagree on the {name} tokens"

    if rank == 0:
        stats = model.load_stats
        new = args.max_new_tokens * len(PROMPTS[: args.batch_size])
        print(f"\nBLOOM ({sum(p.numel() for p in model.module.parameters()) / 1e6:.2f}M parameters per rank), "
              f"tensor parallel over {world_size} ranks, {args.dtype}; rank 0 read "
              f"{stats.bytes_read / 2**20:.2f} of {stats.bytes_full / 2**20:.2f} MiB in {load_s:.2f}s")
        for prompt, g, s in zip(PROMPTS, tokenizer.batch_decode(greedy, skip_special_tokens=True),
                                tokenizer.batch_decode(sampled, skip_special_tokens=True)):
            print(f"\n[{prompt}]\n  greedy : {g!r}\n  sampled: {s!r}")
        print(f"\ngreedy generation: {new} tokens in {greedy_s:.2f}s ({new / greedy_s:.0f} tokens/s); all ranks "
              "agree on every token")


if __name__ == "__main__":
    main()
