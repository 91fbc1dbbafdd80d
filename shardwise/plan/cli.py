"""``shardwise-plan``: plan a layout at any scale from one CPU process (see ``planner.py`` and docs/scale.md).

    shardwise-plan --model llama-70b --world_size 1024 --tp 8 --pp 4 --deepspeed_config ds.json --seq_len 4096
    shardwise-plan --model llama-7b --world_size 64 --zero_stage 3 --micro_batch 2 --json plan.json

Without ``--deepspeed_config`` a config is made from ``--zero_stage``, ``--dtype``, ``--micro_batch`` and
``--gradient_accumulation_steps`` (optimizer AdamW). Exit status: 0 when every sampled rank fits, 1 when one does
not, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from shardwise.plan.hardware import ProfileError, known_profiles
from shardwise.plan.models import PRESETS, ModelSpecError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shardwise-plan", description="Plan a training layout: per-rank memory from "
                                 "the engine's own build path on a fake process group, traffic per process group "
                                 "(intra/inter-node), pipeline bubble, step time, and whether it fits.")
    ap.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}), a Hugging Face config.json "
                    "path, or package.module:function returning an nn.Module")
    ap.add_argument("--world_size", type=int, required=True, help="number of ranks (accelerators)")
    ap.add_argument("--gpus_per_node", type=int, default=None, help="ranks per node (default: the hardware's)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages")
    ap.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel degree")
    ap.add_argument("--virtual_stages", type=int, default=1, help="model chunks per pipeline rank (interleaved)")
    ap.add_argument("--sequence_parallel", action="store_true", help="Megatron sequence parallelism (tp > 1)")
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--checkpoint_activations", action="store_true", help="activation checkpointing on every block")
    ap.add_argument("--deepspeed_config", "--config", dest="config", default=None, help="ds_config.json")
    ap.add_argument("--zero_stage", type=int, default=1, choices=(0, 1, 2, 3), help="without --deepspeed_config")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="without --deepspeed_config")
    ap.add_argument("--micro_batch", type=int, default=1, help="without --deepspeed_config")
    ap.add_argument("--gradient_accumulation_steps", type=int, default=None,
                    help="without --deepspeed_config (default: 1, or 2 x pp with pipelines)")
    ap.add_argument("--hardware", default="h100-sxm", help=f"profile name ({', '.join(known_profiles())}) or JSON")
    ap.add_argument("--ranks", type=int, nargs="*", default=None, help="ranks to probe (default: first/last "
                    "pipeline stage x first/last tensor rank)")
    ap.add_argument("--json", default=None, help="also write the plan as JSON to this path ('-': stdout only)")
    return ap


def _ds_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.config:
        from shardwise.config import read_config_dict

        return read_config_dict(args.config)
    gas = args.gradient_accumulation_steps or (2 * args.pp if args.pp > 1 else 1)
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": gas,
                           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                           "zero_optimization": {"stage": args.zero_stage}}
    if args.dtype != "fp32":
        cfg[args.dtype] = {"enabled": True}
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``shardwise-plan``."""
    from shardwise.plan.planner import PlanError, plan_layout
    from shardwise.plan.report import render

    args = _parser().parse_args(argv)
    try:
        plan = plan_layout(args.model, args.world_size, ds_config=_ds_config(args), gpus_per_node=args.gpus_per_node,
                           tp=args.tp, pp=args.pp, sp=args.sp, virtual_stages=args.virtual_stages,
                           sequence_parallel=args.sequence_parallel, seq_len=args.seq_len,
                           checkpoint_activations=args.checkpoint_activations, hardware=args.hardware,
                           ranks=args.ranks)
    except (PlanError, ModelSpecError, ProfileError, ValueError) as exc:
        print(f"shardwise-plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(plan.as_dict(), indent=1))
    else:
        print(render(plan))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(plan.as_dict(), f, indent=1)
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
