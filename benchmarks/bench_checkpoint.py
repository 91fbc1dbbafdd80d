"""Checkpoint benchmark: save/load time and size on disk for a GPT of a few hundred MB, shardwise vs DeepSpeed.

Run:  python benchmarks/bench_checkpoint.py                 (shardwise rows; DeepSpeed rows when its venv exists)
      python benchmarks/bench_checkpoint.py --quick         (a ~4x smaller model)

Rows, all on 2 ranks (gloo, CPU, one thread per rank) unless stated, ZeRO-2, AdamW, after one training step:

* save: wall time of ``save_checkpoint`` until it returns on every rank (files fsynced and committed);
* async save: time until ``save_checkpoint`` returns (the training loop is blocked that long), then until the
  checkpoint is committed (shardwise's ``checkpoint.async_save``; DeepSpeed 0.19 has no equivalent on CPU);
* load: ``load_checkpoint`` into a freshly built engine of the same layout (sha256 verification included);
* load at 1 rank: into a stage-0 engine on one rank (resharding; DeepSpeed needs an offline universal conversion);
* to-fp32: offline consolidation into one safetensors file, one process: time, and peak RSS above the RSS after
  imports (``ru_maxrss``), next to the size of the fp32 model it writes.

Each timed row is the best of ``--repeat`` runs (the machine is shared; slower runs measure the neighbours). Files
were just written, so loads read from the page cache: the numbers are the software's cost, not the disk's.
DeepSpeed rows run in ``benchmarks/.venv-deepspeed`` (``bash benchmarks/setup_deepspeed_env.sh``) and import only
torch, DeepSpeed and ``shardwise/models/gpt.py`` by path. Results: ``benchmarks/results/checkpoint.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "checkpoint.md"
DS_PYTHON = ROOT / "benchmarks" / ".venv-deepspeed" / "bin" / "python"


# -- worker side (runs under torch.distributed.run, in either venv) ---------------------------------------------------
def _gpt(args):
    spec = importlib.util.spec_from_file_location("bench_gpt", ROOT / "shardwise" / "models" / "gpt.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return mod.GPT(mod.GPTConfig(vocab_size=args.vocab, block_size=128, n_layer=args.n_layer, n_head=8,
                                 n_embd=args.n_embd))


def _config(args, stage: int) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
           "zero_optimization": {"stage": stage}}
    if args.async_save:
        cfg["checkpoint"] = {"async_save": True}
    return cfg


def _engine(args, stage: int):
    model = _gpt(args)
    if args.engine == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=_config(args, stage))
    else:
        import shardwise

        engine, _, _, _ = shardwise.initialize(model=model, config=_config(args, stage))
    return engine


def _train_step(engine, args) -> None:
    g = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, args.vocab, (2, 129), generator=g)
    loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)
    engine.step()


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def worker(args) -> None:
    torch.set_num_threads(1)
    if args.engine != "deepspeed" and not dist.is_initialized():
        dist.init_process_group("gloo")
    stage = 0 if args.worker == "load1" else 2
    engine = _engine(args, stage)
    result: dict = {"world": dist.get_world_size() if dist.is_initialized() else 1}
    if args.worker == "save":
        _train_step(engine, args)
        times = []
        for i in range(args.repeat):
            if args.async_save:
                dist.barrier()
                start = time.perf_counter()
                engine.save_checkpoint(args.dir, tag=f"t{i}")
                returned = time.perf_counter() - start
                from shardwise.checkpoint import wait_for_checkpoint

                wait_for_checkpoint(engine)
                dist.barrier()
                times.append((returned, time.perf_counter() - start))
            else:
                times.append(_timed(lambda i=i: engine.save_checkpoint(args.dir, tag=f"t{i}")))
        result["times"] = times
    else:
        result["times"] = [_timed(lambda: engine.load_checkpoint(args.dir, tag="t0")) for _ in range(args.repeat)]
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()


def _rss_anon() -> int:
    """Anonymous resident memory (heap, tensors) from /proc; excludes file pages mapped by the reader."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


def to_fp32_worker(args) -> None:
    """One process: consolidate ``args.dir``'s tag t0 to ``args.outdir``; report time and peak memory above the
    memory after imports: ``ru_maxrss`` (all resident pages, including the input files' pages that the mmap-based
    readers touch) and the peak of anonymous memory, sampled every 2 ms."""
    if args.engine == "deepspeed":
        from deepspeed.utils import zero_to_fp32 as z

        def run() -> None:
            try:  # its default output: torch.save (sharding by size needs huggingface_hub)
                z.convert_zero_checkpoint_to_fp32_state_dict(args.dir, args.outdir, tag="t0")
            except ImportError:  # the same consolidation, one output file
                os.makedirs(args.outdir, exist_ok=True)
                torch.save(z.get_fp32_state_dict_from_zero_checkpoint(args.dir, tag="t0"),
                           os.path.join(args.outdir, "pytorch_model.bin"))
    else:
        from shardwise.checkpoint.consolidate import convert_zero_checkpoint_to_fp32_state_dict

        def run() -> None:
            convert_zero_checkpoint_to_fp32_state_dict(args.dir, args.outdir, tag="t0")
    import threading

    import psutil

    base, base_anon = psutil.Process().memory_info().rss, _rss_anon()
    peak_anon = [base_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak_anon[0] = max(peak_anon[0], _rss_anon())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = sum(p.stat().st_size for p in Path(args.outdir).iterdir() if p.is_file())
    Path(args.out).write_text(json.dumps({"time": elapsed, "peak_above_base": peak - base,
                                          "anon_above_base": peak_anon[0] - base_anon, "output_bytes": out}))


# -- driver side ------------------------------------------------------------------------------------------------
def _run(python: Path | str, args, extra: list[str], nproc: int | None) -> dict:
    out = tempfile.mktemp(suffix=".json")
    base = [str(python)]
    if nproc is not None:
        base += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 str(29600 + os.getpid() % 300)]
    cmd = base + [__file__, "--out", out, "--vocab", str(args.vocab), "--n_layer", str(args.n_layer),
                  "--n_embd", str(args.n_embd), "--repeat", str(args.repeat), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDWISE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(Path(out).read_text())


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_engine(name: str, python: Path | str, args, work: Path) -> dict:
    d = work / name
    row: dict = {}
    save = _run(python, args, ["--worker", "save", "--engine", name, "--dir", str(d)], 2)
    row["save"] = min(save["times"])
    row["size"] = _size(d / "t0")
    if name == "shardwise":
        a = _run(python, args, ["--worker", "save", "--engine", name, "--dir", str(work / "async"),
                                "--async_save"], 2)
        row["async_return"], row["async_commit"] = min(t[0] for t in a["times"]), min(t[1] for t in a["times"])
        shutil.rmtree(work / "async")
        row["load1"] = min(_run(python, args, ["--worker", "load1", "--engine", name, "--dir", str(d)], 1)["times"])
    row["load"] = min(_run(python, args, ["--worker", "load", "--engine", name, "--dir", str(d)], 2)["times"])
    fp32 = _run(python, args, ["--worker", "to_fp32", "--engine", name, "--dir", str(d), "--outdir",
                               str(work / f"{name}-fp32")], None)
    row.update(fp32_time=fp32["time"], fp32_peak=fp32["peak_above_base"], fp32_anon=fp32["anon_above_base"],
               fp32_out=fp32["output_bytes"])
    shutil.rmtree(d)
    shutil.rmtree(work / f"{name}-fp32")
    return row


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def report(rows: dict, args, n_params: int) -> str:
    lines = [
        "# Checkpoint benchmark",
        "",
        f"GPT {n_params / 1e6:.1f}M parameters (vocab {args.vocab}, {args.n_layer} layers, width {args.n_embd}), "
        "fp32, AdamW, ZeRO-2 on 2 CPU ranks (gloo, 1 thread each), after one step. Best of "
        f"{args.repeat}. {platform.processor() or platform.machine()}, torch {torch.__version__}. Produced by "
        "`python benchmarks/bench_checkpoint.py`.",
        "",
        "| engine | size on disk | save | async save: blocks / committed | load (same layout) | load at 1 rank, "
        "stage 0 | to-fp32 time | to-fp32 peak RSS / peak anonymous (output size) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} |  |  |  |  |  |  |")
            continue
        asyn = f"{r['async_return']:.2f} s / {r['async_commit']:.2f} s" if "async_return" in r else "n/a"
        load1 = f"{r['load1']:.2f} s" if "load1" in r else "needs offline conversion"
        lines.append(f"| {name} | {_mb(r['size'])} | {r['save']:.2f} s | {asyn} | {r['load']:.2f} s | {load1} | "
                     f"{r['fp32_time']:.2f} s | {_mb(r['fp32_peak'])} / {_mb(r['fp32_anon'])} ({_mb(r['fp32_out'])}) |")
    lines += ["", "Loads include sha256 verification of every shard (shardwise). Sizes: shardwise stores fp32 "
              "master weights and both Adam moments once (the fp32 model needs no separate copy); DeepSpeed "
              "stores the module's weights and the fp32 master weights. to-fp32 memory is above the process's "
              "memory after imports: peak RSS counts the input files' pages mapped by the reader (reclaimable page "
              "cache), peak anonymous memory is what the conversion itself allocates. shardwise writes "
              "safetensors; DeepSpeed's default output (torch.save) is used for its row.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a ~4x smaller model")
    ap.add_argument("--skip-deepspeed", action="store_true")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--n_layer", type=int, default=8)
    ap.add_argument("--n_embd", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", choices=["save", "load", "load1", "to_fp32"])
    ap.add_argument("--engine", choices=["shardwise", "deepspeed"], default="shardwise")
    ap.add_argument("--dir")
    ap.add_argument("--outdir")
    ap.add_argument("--out")
    ap.add_argument("--async_save", action="store_true")
    ap.add_argument("--local_rank", type=int, default=-1)
    args = ap.parse_args(argv)
    if args.worker == "to_fp32":
        return to_fp32_worker(args)
    if args.worker:
        return worker(args)
    if args.quick:
        args.n_layer, args.n_embd, args.repeat = 4, 256, 2
    n_params = _gpt(args).num_parameters()
    rows: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=os.environ.get("BENCH_DIR")) as tmp:
        rows["shardwise"] = bench_engine("shardwise", sys.executable, args, Path(tmp))
        if not args.skip_deepspeed and DS_PYTHON.exists():
            try:
                rows["DeepSpeed 0.19"] = bench_engine("deepspeed", DS_PYTHON, args, Path(tmp))
            except RuntimeError as exc:
                rows["DeepSpeed 0.19"] = {"error": f"failed: {str(exc).splitlines()[-1][:100]}"}
        elif not args.skip_deepspeed:
            rows["DeepSpeed 0.19"] = {"error": "not run (bash benchmarks/setup_deepspeed_env.sh)"}
    text = report(rows, args, n_params)
    print(text)
    if not args.quick:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
