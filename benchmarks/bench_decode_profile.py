"""Where one decode step's time goes (issue 22 item 3): matmuls vs the tensor-parallel collectives vs everything else
(other tensor ops, and the Python of the model and of ``generate``), for HF single-process and shardwise TP=1/TP=2.

Run:  python benchmarks/bench_decode_profile.py                  (llama-155m of bench_inference.py, fp32, batch 1)
      python benchmarks/bench_decode_profile.py --dtype bf16 --batch 4

Each configuration is a fresh set of processes (one thread per rank, as bench_inference's TP rows). Each rank
loads the model, warms up, times ``generate(N)`` without the profiler (per-token wall time: the median interval
between streamed tokens), then runs it again under ``torch.profiler`` and splits the self CPU time of rank 0 into:
matmul kernels (``aten::mm/addmm/bmm/baddbmm`` and attention), the collectives (shardwise's ``all_reduce_`` /
``all_gather_last``, recorded as ranges: the wait for the slower rank is inside them), other tensor ops, and the rest
of the wall time (Python: module calls, HF's generation loop; the profiler's own overhead lands here too, so the
split is of the profiled run, scaled to the unprofiled per-token time). Writes ``results/decode_profile.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_attention_math")
COMM = ("tp::all_reduce", "tp::all_gather")


def _patch_collectives() -> None:
    """Record shardwise's TP collectives as profiler ranges."""
    import torch

    from shardwise.inference import collectives as C

    for cls in (C.SharedMemoryCollectives, C.TorchCollectives):
        for name, label in (("all_reduce_", "tp::all_reduce"), ("all_gather_last", "tp::all_gather")):
            original = getattr(cls, name)

            def wrapped(self, *args, _original=original, _label=label, **kwargs):
                with torch.profiler.record_function(_label):
                    return _original(self, *args, **kwargs)

            setattr(cls, name, wrapped)


def worker(spec: dict) -> None:
    import bench_inference as B
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    tp = spec["tp"]
    if tp > 1:
        dist.init_process_group("gloo")
    if spec["framework"] == "shardwise":
        sys.path.insert(0, str(ROOT))
        _patch_collectives()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    model = B._load(spec["framework"], spec["path"], dtype, tp)
    ids = torch.randint(3, 1000, (spec["batch"], B.PROMPT), generator=torch.Generator().manual_seed(0))
    barrier = dist.barrier if tp > 1 else (lambda: None)

    def run(new: int) -> list[float]:
        clock = B._Clock()
        barrier()
        clock.start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, streamer=clock)
        return clock.stamps

    run(4)
    new = spec["new_tokens"]
    stamps = run(new)
    per_token = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run(new)
        wall = time.perf_counter() - t0
    buckets = {"matmul": 0.0, "collectives": 0.0, "other ops": 0.0}
    for evt in prof.key_averages():
        if evt.key in COMM:
            buckets["collectives"] += evt.cpu_time_total  # the range: copies, the wait, the sum
        elif evt.key in MATMUL:
            buckets["matmul"] += evt.self_cpu_time_total
        elif evt.key.startswith("aten::"):
            buckets["other ops"] += evt.self_cpu_time_total
    # aten ops inside the collective ranges were counted as "other ops" too: take them out once
    inner = sum(e.self_cpu_time_total for e in prof.events() if e.key.startswith("aten::") and _inside_comm(e))
    buckets["other ops"] = max(0.0, buckets["other ops"] - inner)
    total_us = wall * 1e6
    buckets["python and the rest"] = max(0.0, total_us - sum(buckets.values()))
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({**{k: spec[k] for k in ("framework", "tp", "dtype", "batch")},
                                      "per_token_ms": per_token * 1e3, "profiled_wall_s": wall,
                                      "share": {k: v / total_us for k, v in buckets.items()},
                                      "collective_calls_per_token": sum(
                                          e.count for e in prof.key_averages() if e.key in COMM) / (new + 1)}),
              flush=True)
    if tp > 1:
        dist.barrier()
        dist.destroy_process_group()


def _inside_comm(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in COMM:
            return True
        parent = parent.cpu_parent
    return False


def launch(spec: dict) -> dict:
    import bench_inference as B

    port = B._free_port()
    procs = []
    for rank in range(spec["tp"]):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(spec["tp"]),
               "LOCAL_WORLD_SIZE": str(spec["tp"]), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "SHARDWISE_ACCELERATOR": "cpu", "TRANSFORMERS_VERBOSITY": "error",
               "SHARDWISE_LOG_LEVEL": "WARNING"}
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for rank, p in enumerate(procs):
        out, err = p.communicate(timeout=1800)
        results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode:
            raise SystemExit(f"{spec} rank {rank} exit {p.returncode}: {err.strip().splitlines()[-5:]}")
    return results[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="llama-155m")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--output", type=Path, default=HERE / "results" / "decode_profile.md")
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    import bench_inference as B

    path = str(B.ensure_model(args.model))
    rows = []
    for framework, tp in (("hf", 1), ("shardwise", 1), ("shardwise", 2)):
        spec = {"framework": framework, "tp": tp, "dtype": args.dtype, "batch": args.batch, "path": path,
                "new_tokens": args.new_tokens}
        rows.append(launch(spec))
        print(rows[-1], flush=True)
    keys = list(rows[0]["share"])
    lines = [f"One decode step of {args.model} ({B.MODELS[args.model]}), {args.dtype}, batch {args.batch}, prompt "
             f"{B.PROMPT}, {args.new_tokens} new tokens, one thread per rank; load average "
             f"{os.getloadavg()[0]:.2f} at the end. Shares are of rank 0's profiled generate() wall time, applied "
             "to the unprofiled per-token time.", "",
             "| run | per-token ms | " + " | ".join(f"{k} ms" for k in keys) + " | collective calls / token |",
             "|---|---:|" + "---:|" * len(keys) + "---:|"]
    for r in rows:
        name = "HF single process" if r["framework"] == "hf" else f"shardwise TP={r['tp']}"
        lines.append(f"| {name} | {r['per_token_ms']:.2f} | "
                     + " | ".join(f"{r['share'][k] * r['per_token_ms']:.2f}" for k in keys)
                     + f" | {r['collective_calls_per_token']:.0f} |")
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
