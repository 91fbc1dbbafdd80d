"""Collectives on gloo: shardwise's direct-exchange all-gather and reduce-scatter against gloo's own ring.

    python benchmarks/bench_collectives.py            # 2 and 4 ranks, 0.1-13 MB, writes results/collectives.md

Every rank runs one thread. Each cell is the median of 30 timed calls after 3 warm-up calls, best of 2 rounds
(the machine may be shared), from a barrier; the slower rank's median is reported. "ring" is torch.distributed's
gloo collective called directly; "direct" is the same call through ``shardwise.comm`` (which routes it to
``shardwise/comm/direct.py``); gloo's all-reduce of the same buffer is shown for scale. Results are also checked:
the direct path's output must equal the ring's (bitwise on 2 ranks, where a sum of two is order-free).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    dist.barrier()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _cases(comm, full, part, out_ring, out_direct, rs_ring, rs_direct) -> dict:
    scratch = torch.empty_like(full)
    return {
        "all_gather ring": lambda: dist.all_gather_single(out_ring, part),
        "all_gather direct": lambda: comm.all_gather_into_tensor(out_direct, part),
        "reduce_scatter ring": lambda: dist.reduce_scatter_single(rs_ring, full),
        "reduce_scatter direct": lambda: comm.reduce_scatter_tensor(rs_direct, full),
        "all_reduce (gloo)": lambda: (scratch.copy_(full), dist.all_reduce(scratch)),
    }


def _worker(rank: int, world: int, port: int, rounds: int, sizes: list[float], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from shardwise import comm

    rows = []
    for mb in sizes:
        n = int(mb * 1e6 / 4) // world * world
        chunk = n // world
        full = torch.randn(n, generator=torch.Generator().manual_seed(rank))
        part = full[:chunk].clone()
        out_ring, out_direct = torch.empty(n), torch.empty(n)
        rs_ring, rs_direct = torch.empty(chunk), torch.empty(chunk)
        cases = _cases(comm, full, part, out_ring, out_direct, rs_ring, rs_direct)
        best = {k: min(_time(f) for _ in range(rounds)) for k, f in cases.items()}
        same = torch.equal(out_ring, out_direct) and (
            torch.equal(rs_ring, rs_direct) if world == 2 else torch.allclose(rs_ring, rs_direct, atol=1e-5))
        rows.append({"mb": mb, "times": best, "same": same})
    everyone = [None] * world
    dist.all_gather_object(everyone, rows)
    if rank == 0:
        queue.put(everyone)
    dist.destroy_process_group()


def _run(world: int, rounds: int, sizes: list[float]) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(world, _free_port(), rounds, sizes, queue), nprocs=world, start_method="spawn")
    per_rank = queue.get(timeout=60)
    merged = []
    for i, row in enumerate(per_rank[0]):
        times = {k: max(r[i]["times"][k] for r in per_rank) for k in row["times"]}
        merged.append({"mb": row["mb"], "times": times, "same": all(r[i]["same"] for r in per_rank)})
    return merged


def _table(world: int, rows: list[dict]) -> list[str]:
    lines = [f"### {world} ranks", "",
             "| buffer MB | all-gather ring ms | direct ms | speed-up | reduce-scatter ring ms | direct ms | speed-up "
             "| all-reduce ms | direct = ring |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        t = {k: v * 1e3 for k, v in r["times"].items()}
        lines.append(
            f"| {r['mb']:g} | {t['all_gather ring']:.2f} | {t['all_gather direct']:.2f} | "
            f"{t['all_gather ring'] / t['all_gather direct']:.2f}x | {t['reduce_scatter ring']:.2f} | "
            f"{t['reduce_scatter direct']:.2f} | {t['reduce_scatter ring'] / t['reduce_scatter direct']:.2f}x | "
            f"{t['all_reduce (gloo)']:.2f} | {'yes' if r['same'] else 'NO'} |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sizes", default="0.1,0.5,1.75,6.5,13", help="buffer sizes in MB, comma-separated")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    lines = ["# Collectives on gloo", "",
             "Buffer = the full tensor (all-gather output, reduce-scatter input), fp32, one thread per rank; the "
             "slower rank's median of 30 calls, best of "
             f"{args.rounds} rounds. Both paths send (n-1)/n of the buffer per rank.", ""]
    for world in (int(w) for w in args.worlds.split(",")):
        rows = _run(world, args.rounds, [float(x) for x in args.sizes.split(",")])
        lines += _table(world, rows)
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "collectives.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
