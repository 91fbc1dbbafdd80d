"""Pipeline-parallel benchmarks: bubble of 1F1B and interleaved 1F1B against theory, bytes per micro-batch with
and without ``pipe_partitioned``, and step time of PP=2 against DP=2 on the same model.

Run:  python benchmarks/bench_pipe.py            (from the repository root; ~1-2 minutes on 2 cores)
      python benchmarks/bench_pipe.py --quick    (fewer steps)

Model: a deep MLP written as pipeline layers (``depth`` x [Linear(width, width), GELU]), MSE loss, fp32, AdamW,
balanced exactly by ``partition_method="uniform"``. Ranks are gloo processes on this machine, one thread each.

* Bubble: before each measured ``train_batch`` the ranks meet at a barrier; each rank records its compute time
  (forward + backward) and the time until its last pipeline transfer. The step's makespan is the largest of the
  latter over ranks; a rank's bubble is ``1 - compute / makespan``; reported is the mean over ranks (best step),
  against ``(p - 1) / (m + p - 1)`` (1F1B) and ``(p - 1) / (v m + p - 1)`` (interleaved, ``v`` chunks).
  Point-to-point latency and the extra sends of interleaving add to the measured bubble; the "theory + latency"
  column replays the schedules with the measured compute times and message latency to show how much.
* Bytes: the comms log's ``send`` bytes per micro-batch per rank at PP=2 x TP=2 (4 ranks), where every
  tensor-parallel rank holds the same activation (no tensor-parallel layers in this model), with
  ``pipeline.pipe_partitioned`` / ``grad_partitioned`` on and off (handshake headers excluded: measured after
  the first step).
* Step time: PP=2 (one replica, ``m`` micro-batches) against DP=2 (``m / 2`` micro-batches per replica, the plain
  engine on ``nn.Sequential`` of the same layers): same model, same global batch. Best step.

Steps are reported best-of-N (as ``timeit`` advises: on a shared machine the slower steps measure the
neighbours). Writes the markdown table to ``benchmarks/results/pipe.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "pipe.md"
WIDTH, DEPTH, MICRO = 1024, 8, 32


def _specs(width: int, depth: int) -> list:
    from shardwise.pipe import LayerSpec

    specs = []
    for _ in range(depth):
        specs += [LayerSpec(nn.Linear, width, width), LayerSpec(nn.GELU)]
    return specs


def _config(micro: int, gas: int, **extra: object) -> dict:
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, **extra}


def _batches(step: int, dp_rank: int, gas: int, micro: int, width: int) -> list:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    return [(torch.randn(micro, width, generator=g), torch.randn(micro, width, generator=g)) for _ in range(gas)]


def pipe_rank(stages: int, chunks: int, tp: int, gas: int, steps: int, partitioned: bool) -> list[dict]:
    """Train the MLP pipeline; per measured step: compute, pipeline and wall seconds, bytes sent."""
    import shardwise
    from shardwise import comm
    from shardwise.comm.topology import Topology
    from shardwise.pipe import PipelineModule

    model = PipelineModule(_specs(WIDTH, DEPTH), topology=Topology(pp=stages, tp=tp), loss_fn=F.mse_loss,
                           partition_method="uniform", virtual_stages=chunks, seed_layers=True)
    cfg = _config(MICRO, gas, pipeline={"pipe_partitioned": partitioned, "grad_partitioned": partitioned})
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
    dp = engine.topology.coord("dp")
    engine.train_batch(iter(_batches(0, dp, gas, MICRO, WIDTH)))  # warm-up (and the shape handshakes)
    out = []
    for step in range(1, steps + 1):
        data = iter(_batches(step, dp, gas, MICRO, WIDTH))
        comm.barrier()
        comm.COMMS_LOG.reset()
        t0 = time.perf_counter()
        engine.train_batch(data)
        wall = time.perf_counter() - t0
        s = engine.last_batch_stats
        out.append({"compute": s.compute_s, "pipeline": s.pipeline_s, "wall": wall,
                    "fwd": s.forward_s / max(1, s.forwards), "bwd": s.backward_s / max(1, s.backwards),
                    "sent": comm.COMMS_LOG.totals(op="send").msg_bytes, "stage": engine.stage_id})
    return out


def ping_rank(rounds: int = 20) -> float:
    """One-way time of an activation-sized point-to-point message (best of ``rounds`` round trips)."""
    from shardwise import comm

    buf = torch.zeros(MICRO * WIDTH)
    rank, best = comm.get_rank(), float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        if rank == 0:
            comm.send(buf, 1)
            comm.recv(buf, 1)
        else:
            comm.recv(buf, 0)
            comm.send(buf, 0)
        best = min(best, (time.perf_counter() - t0) / 2)
    return best


def _replayed(results: list[list[dict]], stages: int, chunks: int, gas: int, latency: float) -> float:
    """The bubble the schedule would have with this run's per-chunk forward/backward times and ``latency``."""
    from shardwise.pipe import simulate
    from shardwise.pipe.schedule import make_train_schedule

    rows = [row for r in results for row in r]
    fwd = min(row["fwd"] for row in rows)
    bwd = min(row["bwd"] for row in rows)
    scheds = [make_train_schedule(gas, stages, s, chunks) for s in range(stages)]
    return simulate.run(scheds, fwd=fwd, bwd=bwd, latency=latency).bubble


def dp_rank(gas: int, steps: int) -> list[float]:
    """Train ``nn.Sequential`` of the same layers with the plain data-parallel engine; seconds per step."""
    import shardwise
    from shardwise import comm

    torch.manual_seed(0)
    model = nn.Sequential(*[spec.build() for spec in _specs(WIDTH, DEPTH)])
    engine, _, _, _ = shardwise.initialize(model=model, config=_config(MICRO, gas))
    dp = engine.topology.coord("dp")
    times = []
    for step in range(steps + 1):
        batches = _batches(step, dp, gas, MICRO, WIDTH)
        comm.barrier()
        t0 = time.perf_counter()
        for x, y in batches:
            engine.backward(F.mse_loss(engine(x), y))
            engine.step()
        if step:
            times.append(time.perf_counter() - t0)
    return times


def _bubble(results: list[list[dict]]) -> tuple[float, float]:
    """(best measured bubble, best step seconds) from every rank's per-step records."""
    bubbles, walls = [], []
    for step in range(len(results[0])):
        rows = [r[step] for r in results]
        span = max(row["pipeline"] for row in rows)
        bubbles.append(statistics.mean(1.0 - row["compute"] / span for row in rows))
        walls.append(max(row["wall"] for row in rows))
    return min(bubbles), min(walls)


def main(argv: list[str] | None = None) -> str:
    from shardwise.pipe.schedule import bubble_fraction
    from tests.dist import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    steps = 3 if args.quick else 6
    this = sys.modules[__name__].__spec__.name if __spec__ else "benchmarks.bench_pipe"
    mod = __import__(this, fromlist=["pipe_rank"])
    lines = [f"Pipeline benchmarks: MLP {DEPTH} x [Linear({WIDTH}, {WIDTH}), GELU], micro-batch {MICRO}, fp32, "
             f"gloo on CPU ({torch.__version__}), one thread per rank; best of {steps} steps.", "",
             "| schedule | stages | chunks | micro-batches | bubble measured | bubble theory | theory + latency "
             "| step ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    latency = min(run_ranks(mod.ping_rank, world_size=2))
    for gas in (4, 8):
        for chunks in (1, 2):
            res = run_ranks(mod.pipe_rank, 2, chunks, 1, gas, steps, True, world_size=2, timeout=300)
            bubble, wall = _bubble(res)
            name = "1F1B" if chunks == 1 else "interleaved 1F1B"
            lines.append(f"| {name} | 2 | {chunks} | {gas} | {bubble:.3f} | {bubble_fraction(2, gas, chunks):.3f} "
                         f"| {_replayed(res, 2, chunks, gas, latency):.3f} | {wall * 1e3:.0f} |")
    lines.append(f"\n'theory + latency': the schedules replayed (``shardwise.pipe.simulate``) with this run's "
                 f"fastest per-chunk forward/backward times and the measured one-way point-to-point time of one "
                 f"activation ({latency * 1e3:.2f} ms).")
    lines += ["", "| PP=2 x TP=2, activations replicated over TP | bytes sent per micro-batch per rank |", "|---|---:|"]
    for partitioned in (False, True):
        res = run_ranks(mod.pipe_rank, 2, 1, 2, 4, 1, partitioned, world_size=4, timeout=300)
        per_mb = statistics.mean(r[0]["sent"] for r in res) / 4
        lines.append(f"| pipe_partitioned / grad_partitioned {str(partitioned).lower()} | {per_mb:,.0f} |")
    gas = 8
    pp = run_ranks(mod.pipe_rank, 2, 1, 1, gas, steps, True, world_size=2, timeout=300)
    dp = run_ranks(mod.dp_rank, gas // 2, steps, world_size=2, timeout=300)
    pp_ms = _bubble(pp)[1] * 1e3
    dp_ms = min(max(t) for t in zip(*dp)) * 1e3
    lines += ["", f"| same model, global batch {gas} x {MICRO} | step ms |", "|---|---:|",
              f"| PP=2 (1F1B, {gas} micro-batches) | {pp_ms:.0f} |",
              f"| DP=2 ({gas // 2} micro-batches per replica, ZeRO-0) | {dp_ms:.0f} |"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"Machine load average (1 min) at the end of the run: {load:.1f} on {os.cpu_count()} cores; other "
              "processes share the cores, so timings are preliminary."]
    table = "\n".join(lines) + "\n"
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    return table


if __name__ == "__main__":
    import benchmarks.bench_pipe as _self  # run the rank functions from an importable module, not __main__

    _self.main()
