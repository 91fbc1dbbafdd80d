"""Cost of planning at 1,024 ranks on this machine: wall time, CPU time and peak RSS of ``shardwise-plan``.

Run:  python benchmarks/bench_plan.py            (from the repository root; ~3-5 minutes on 2 busy cores)
      python benchmarks/bench_plan.py --quick    (the first layout only)

Each layout runs as a fresh ``python -m shardwise.plan.cli`` process (imports included, as a user runs it);
``resource.getrusage(RUSAGE_CHILDREN)`` gives its CPU time and peak RSS. On a shared machine wall time measures
the neighbours too: the CPU time (user + system) is what the plan itself costs. Writes
``benchmarks/results/plan.md``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [
    ("LLaMA-70B, pp 4 x dp 32 x tp 8, ZeRO-1, ckpt, 4 ranks probed",
     ["--model", "llama-70b", "--world_size", "1024", "--tp", "8", "--pp", "4", "--zero_stage", "1",
      "--gradient_accumulation_steps", "16", "--checkpoint_activations"]),
    ("LLaMA-405B, pp 16 x dp 8 x tp 8 + SP, ZeRO-1, ckpt, 4 ranks probed",
     ["--model", "llama-405b", "--world_size", "1024", "--tp", "8", "--pp", "16", "--sequence_parallel",
      "--zero_stage", "1", "--gradient_accumulation_steps", "64", "--checkpoint_activations"]),
    ("LLaMA-7B, dp 1024, ZeRO-3 + hpZ, 1 rank probed",
     ["--model", "llama-7b", "--world_size", "1024", "--deepspeed_config", "benchmarks/configs/plan_zero3_hpz.json"]),
    ("LLaMA-405B, dp 1024, ZeRO-3 + hpZ, ckpt, 1 rank probed (126 blocks on one rank)",
     ["--model", "llama-405b", "--world_size", "1024", "--deepspeed_config",
      "benchmarks/configs/plan_zero3_hpz.json", "--checkpoint_activations"]),
]


def _run(args: list[str]) -> tuple[float, float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "shardwise.plan.cli", "--seq_len", "4096", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1) or "planned in " not in proc.stdout:
        raise SystemExit(f"shardwise-plan failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    planned = float(proc.stdout.rsplit("planned in ", 1)[1].split(" s", 1)[0])
    return wall, cpu, planned, after.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows = []
    for name, argv in LAYOUTS[:1] if args.quick else LAYOUTS:
        wall, cpu, planned, rss = _run(argv)
        rows.append(f"| {name} | {wall:.1f} | {planned:.1f} | {cpu:.1f} | {rss / 1e9:.2f} |")
        print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    text = "\n".join([
        "# shardwise-plan at 1,024 ranks (this machine, 2 cores)", "",
        f"Load average when measured: {load:.1f} (other jobs share the 2 cores; CPU time is the plan's own cost).",
        "Peak RSS is the largest over the layouts run so far (getrusage of children).", "",
        "| layout | wall s (process) | wall s (planning, without imports) | CPU s | peak RSS GB |",
        "|---|---:|---:|---:|---:|", *rows, ""])
    out = ROOT / "benchmarks" / "results" / "plan.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
