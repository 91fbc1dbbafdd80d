"""Larger than RAM (issue 22 item 2): train a ~2B-parameter LLaMA whose model states (16 bytes/param, ~33 GB) exceed
this machine's 24 GiB, with ZeRO-3 + ``offload_param: nvme`` + ``offload_optimizer: nvme``.

Run:

    python benchmarks/bench_nvme_large.py                      # 2.07B LLaMA, 2 ranks, bf16, seq 128, 4 steps
    python benchmarks/bench_nvme_large.py --quick              # a 4M-parameter smoke test of the same path
    python benchmarks/bench_nvme_large.py --nvme /tmp/nvme --ranks 1 --steps 3

What it does:

1. measures the disk with ``dd`` (``oflag=direct`` write and ``iflag=direct`` read of ``--dd_gb`` GB in 8 MiB
   blocks, in the ``--nvme`` directory), the rate the offload I/O is compared with;
2. starts ``--ranks`` ranks (``shardwise`` launcher) that build the model inside ``shardwise.zero.Init`` (bf16,
   partitioned as it is built, never whole in memory), train ``--steps`` steps on one fixed batch (micro-batch 1;
   memorising it makes the loss fall within a few steps) with AdamW, and time each step: forward, backward,
   optimizer step; within those, the time the training thread waited for NVMe reads, spent in NVMe writes, and
   waited for communication (``DirectWork.wait`` of the all-gathers / reduce-scatters and the clip all-reduce).
   ``compute`` = step time minus those. The I/O threads' busy time and bytes give the achieved GB/s;
3. writes ``benchmarks/results/nvme_large.json`` / ``.md`` and deletes the offload files.

Peak RSS is ``ru_maxrss`` per rank (page cache is not RSS: the files go through the kernel's cache).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"

FULL = {"dim": 2560, "n_layers": 24, "n_heads": 20, "vocab": 32000}
QUICK = {"dim": 256, "n_layers": 2, "n_heads": 4, "vocab": 1000}


# -- instrumentation (worker side) ----------------------------------------------------------------------------
class Timers:
    """Seconds and bytes, summed per phase; thread-safe (the I/O pool threads add their busy time too)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[str, float] = {}

    def add(self, key: str, value: float) -> None:
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + value

    def take(self) -> dict[str, float]:
        with self.lock:
            out, self.values = self.values, {}
        return out


TIMERS = Timers()


def instrument() -> None:
    """Wrap the NVMe store's read/fetch/write and the communication waits with timers (benchmark only)."""
    import torch.distributed as dist

    from shardwise.comm import direct
    from shardwise.zero import param_offload

    store = param_offload.NvmeStore
    main_thread = threading.main_thread()

    def timed(fn, key, nbytes=None, main_only=False):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if not main_only or threading.current_thread() is main_thread:
                    TIMERS.add(key, time.perf_counter() - t)
        return wrapper

    read = store._read

    def _read(self, offset, n):
        t = time.perf_counter()
        out = read(self, offset, n)
        TIMERS.add("read_busy_s", time.perf_counter() - t)
        TIMERS.add("read_bytes", n * self.itemsize)
        return out

    write = store.write

    def _write(self, offset, values):
        t = time.perf_counter()
        out = write(self, offset, values)
        TIMERS.add("write_busy_s", time.perf_counter() - t)
        TIMERS.add("write_bytes", values.numel() * self.itemsize)
        if threading.current_thread() is main_thread:
            TIMERS.add("write_wait_s", time.perf_counter() - t)
        return out

    store._read = _read
    store.write = _write
    store.fetch = timed(store.fetch, "read_wait_s", main_only=True)
    if hasattr(store, "write_async"):  # overlapped writes: the training thread's wait for them is write wait
        write_async = store.write_async

        class TimedFuture:
            def __init__(self, future):
                self.future = future

            def result(self, timeout=None):
                t = time.perf_counter()
                try:
                    return self.future.result(timeout)
                finally:
                    TIMERS.add("write_wait_s", time.perf_counter() - t)

        store.write_async = lambda self, offset, values: TimedFuture(write_async(self, offset, values))
    direct.DirectWork.wait = timed(direct.DirectWork.wait, "comm_wait_s", main_only=True)
    dist.all_reduce = timed(dist.all_reduce, "comm_wait_s", main_only=True)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    import shardwise
    from shardwise.models.llama import Llama, LlamaConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    instrument()
    shardwise.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = QUICK if args.quick else FULL
    cfg = LlamaConfig(vocab_size=shape["vocab"], dim=shape["dim"], n_layers=shape["n_layers"],
                      n_heads=shape["n_heads"], max_seq_len=args.seq)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    config = offload_config(args, bf16=args.precision == "bf16")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with shardwise.zero.Init(dtype=dtype, remote_device="nvme"):
        model = Llama(cfg)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p._sw_init_shape.numel() for p in model.parameters())
    build_s = time.perf_counter() - t0
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    engine, _, _, _ = shardwise.initialize(model=model, config=config)
    init_s = time.perf_counter() - t0 - build_s
    rss_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator().manual_seed(1234 + rank)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    TIMERS.take()
    steps = []
    for step in range(args.steps):
        phases = {}
        t = time.perf_counter()
        loss = engine(x, y)
        phases["forward_s"] = time.perf_counter() - t
        fwd = TIMERS.take()
        t = time.perf_counter()
        engine.backward(loss)
        phases["backward_s"] = time.perf_counter() - t
        bwd = TIMERS.take()
        t = time.perf_counter()
        engine.step()
        phases["optimizer_s"] = time.perf_counter() - t
        opt = TIMERS.take()
        total = phases["forward_s"] + phases["backward_s"] + phases["optimizer_s"]
        record = {"step": step, "loss": loss.item(), "step_s": total, **phases,
                  "forward_backward": {k: fwd.get(k, 0.0) + bwd.get(k, 0.0) for k in set(fwd) | set(bwd)},
                  "optimizer": opt, "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        steps.append(record)
        if rank == 0:
            print(f"step {step}: loss {record['loss']:.4f}  {total:.1f} s (fwd {phases['forward_s']:.1f}, bwd "
                  f"{phases['backward_s']:.1f}, opt {phases['optimizer_s']:.1f})  load {os.getloadavg()[0]:.1f}",
                  flush=True)
    mine = {"rank": rank, "steps": steps, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_build_bytes": rss_built, "rss_after_init_bytes": rss_init, "build_s": build_s,
            "engine_init_s": init_s, "memory_breakdown": engine.memory_breakdown()}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        result = {"params": n_params, "shape": shape, "seq": args.seq, "precision": args.precision,
                  "ranks": world, "sub_group_size": args.sub_group, "lr": args.lr, "per_rank": everyone,
                  "model_states_16B_per_param_gb": 16 * n_params / 1e9, "torch": torch.__version__}
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()


# -- driver ---------------------------------------------------------------------------------------------------
def dd_rates(directory: Path, gb: float) -> dict[str, float]:
    """Sequential direct-I/O write and read rates (GB/s) of the disk under ``directory``."""
    path = directory / "dd-probe.bin"
    count = max(1, int(gb * 1e9 / (8 << 20)))
    out = {}
    try:
        for kind, cmd in (("write", ["dd", "if=/dev/zero", f"of={path}", "bs=8M", f"count={count}",
                                     "oflag=direct", "conv=fsync"]),
                          ("read", ["dd", f"if={path}", "of=/dev/null", "bs=8M", "iflag=direct"])):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            out[f"{kind}_gbps"] = count * (8 << 20) / (time.perf_counter() - t) / 1e9
        out["bytes"] = count * (8 << 20)
    finally:
        path.unlink(missing_ok=True)
    return out


def summarise(result: dict, dd: dict, load: list[str], command: str) -> str:
    """The markdown report of one run."""
    per = result["per_rank"]
    n = result["params"]
    lines = ["## Larger than RAM: ZeRO-3 + NVMe parameter and optimizer offload (issue 22)", "",
             f"`{command}`", "",
             f"LLaMA {result['shape']} ({n / 1e9:.2f}B parameters; model states at 16 bytes/param = "
             f"{result['model_states_16B_per_param_gb']:.1f} GB > 24 GiB RAM), {result['ranks']} rank(s), "
             f"{result['precision']}, seq {result['seq']}, micro-batch 1, AdamW lr {result['lr']}, sub_group_size "
             f"{result['sub_group_size']:,}. Load average before / after: {load[0]} / {load[1]} "
             "(the machine was shared; times are measured under that load).", "",
             f"Disk (`dd`, 8 MiB blocks, direct I/O, {dd.get('bytes', 0) / 1e9:.1f} GB): write "
             f"{dd.get('write_gbps', float('nan')):.2f} GB/s, read {dd.get('read_gbps', float('nan')):.2f} GB/s.", "",
             "| step | loss | step s | fwd s | bwd s | opt s | fwd+bwd: NVMe read wait / comm wait s | "
             "opt: read wait / write s | read GB (GB/s busy) | write GB (GB/s busy) | compute s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    r0 = per[0]
    for s in r0["steps"]:
        fb, op = s["forward_backward"], s["optimizer"]
        rb = fb.get("read_bytes", 0) + op.get("read_bytes", 0)
        wb = fb.get("write_bytes", 0) + op.get("write_bytes", 0)
        rbusy = fb.get("read_busy_s", 0) + op.get("read_busy_s", 0)
        wbusy = fb.get("write_busy_s", 0) + op.get("write_busy_s", 0)
        waits = sum(d.get(k, 0) for d in (fb, op) for k in ("read_wait_s", "write_wait_s", "comm_wait_s"))
        lines.append(
            f"| {s['step']} | {s['loss']:.4f} | {s['step_s']:.1f} | {s['forward_s']:.1f} | {s['backward_s']:.1f} | "
            f"{s['optimizer_s']:.1f} | {fb.get('read_wait_s', 0):.1f} / {fb.get('comm_wait_s', 0):.1f} | "
            f"{op.get('read_wait_s', 0):.1f} / {op.get('write_wait_s', 0):.1f} | {rb / 1e9:.2f} "
            f"({rb / max(rbusy, 1e-9) / 1e9:.2f}) | {wb / 1e9:.2f} ({wb / max(wbusy, 1e-9) / 1e9:.2f}) | "
            f"{s['step_s'] - waits:.1f} |")
    lines += ["", "Rank 0's steps shown; loss is rank 0's (each rank memorises its own fixed batch). Per rank: "
              + "; ".join(f"rank {p['rank']}: peak RSS {p['peak_rss_bytes'] / 2**30:.2f} GiB (after zero.Init "
                          f"build {p['rss_after_build_bytes'] / 2**30:.2f}, after engine init "
                          f"{p['rss_after_init_bytes'] / 2**30:.2f}), resident model states "
                          f"{sum(p['memory_breakdown'].values()) / 2**30:.2f} GiB, build {p['build_s']:.0f} s + "
                          f"engine init {p['engine_init_s']:.0f} s" for p in per), ""]
    return "\n".join(lines)


def offload_config(args: argparse.Namespace, bf16: bool) -> dict:
    """The run's DeepSpeed-style config (also ``bench_nvme_deepspeed.py``'s): ZeRO-3 with parameters and optimizer
    on NVMe under ``args.nvme``, AdamW, clipping 1.0, micro-batch 1."""
    zero = {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": args.nvme, "buffer_count": 5},
            "offload_optimizer": {"device": "nvme", "nvme_path": args.nvme},
            "sub_group_size": args.sub_group, "stage3_max_live_parameters": 100_000_000,
            "stage3_max_reuse_distance": 100_000_000, "stage3_prefetch_bucket_size": 50_000_000}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "steps_per_print": 10**9, "zero_optimization": zero,
              "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0}}}
    if bf16:
        config["bf16"] = {"enabled": True}
    return config


def run_arguments(description: str, steps: int, nvme: str) -> argparse.ArgumentParser:
    """The options both NVMe benchmarks take (the worker's hidden ones included)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a tiny model through the same path (smoke test)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--sub_group", type=int, default=50_000_000, help="zero_optimization.sub_group_size")
    ap.add_argument("--nvme", default=nvme, help="directory for the offload files (deleted after)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    return ap


def main() -> None:
    ap = run_arguments(__doc__.splitlines()[0], steps=4, nvme="/work/nvme_bench")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--dd_gb", type=float, default=2.0)
    ap.add_argument("--timeout", type=int, default=7200)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    nvme = Path(args.nvme)
    nvme.mkdir(parents=True, exist_ok=True)
    dd = dd_rates(nvme, 0.1 if args.quick else args.dd_gb)
    print(f"dd: {dd}", flush=True)
    out = nvme / "result.json"
    launcher = Path(sys.executable).with_name("shardwise")
    cmd = [str(launcher), "--num_gpus", str(args.ranks), str(Path(__file__).resolve()), "--worker",
           "--out", str(out), "--steps", str(args.steps), "--seq", str(args.seq), "--precision", args.precision,
           "--lr", str(args.lr), "--sub_group", str(args.sub_group), "--nvme", str(nvme)]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GLOO_SOCKET_IFNAME": "lo",
           "SHARDWISE_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    load = [open("/proc/loadavg").read().split()[0]]
    try:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=args.timeout)
        load.append(open("/proc/loadavg").read().split()[0])
        result = json.loads(out.read_text())
    finally:
        for child in nvme.glob("shardwise-rank*"):
            shutil.rmtree(child, ignore_errors=True)
        out.unlink(missing_ok=True)
    result["dd"] = dd
    result["loadavg"] = load
    command = "python benchmarks/bench_nvme_large.py " + " ".join(sys.argv[1:])
    report = summarise(result, dd, load, command.strip())
    print(report)
    if not args.quick:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "nvme_large.json").write_text(json.dumps(result, indent=1))
        (RESULTS_DIR / "nvme_large.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
