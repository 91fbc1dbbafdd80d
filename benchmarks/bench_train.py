"""Training benchmark: shardwise ZeRO stages 0/1/2 against torch DDP, FSDP2 and DeepSpeed 0.19, on 2 CPU ranks (gloo).

Run (one command; the DeepSpeed rows need ``bash benchmarks/setup_deepspeed_env.sh`` once, and are skipped with a
note when its venv is absent):

    python benchmarks/bench_train.py                     # sizes small + medium, 2 rounds, every row
    python benchmarks/bench_train.py --quick             # small + medium, 1 round, 6 measured steps
    python benchmarks/bench_train.py --sizes large --only 'DDP|stage 2'

Every row trains the same GPT (``shardwise.models.GPT``), from the same seed, on the same batches, with AdamW
(lr 1e-3, weight decay 0.01) and gradient clipping 1.0; every other knob is the engine's default. Each row is a fresh
2-rank job (``benchmarks/train_worker.py``) started by its own launcher: ``shardwise --num_gpus 2`` for shardwise,
``torch.distributed.run`` for DDP/FSDP2, and ``torch.distributed.run`` from ``benchmarks/.venv-deepspeed`` for
DeepSpeed (the project never imports DeepSpeed). Reported per row:

* median step time (forward + backward + step, the slower rank's time per step) and its ratio to DDP's in the
  same run. The machine may be shared: rows run in ``--rounds`` rounds in rotated order and each row keeps its
  best round (the slow rounds measure the neighbours);
* peak RSS per rank (``ru_maxrss``, the larger rank), also as a ratio to DDP;
* bytes communicated per step (message and ring-wire bytes; see train_worker.py for the counting method);
* the loss curve; every row must agree with DDP's (fp32 rows to 1e-4 relative, bf16 rows to 2e-2).

Writes ``benchmarks/results/train.json`` and ``train.png`` and the "## Training" section of ``benchmarks/RESULTS.md``
(other sections of that file are left as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "train_worker.py"
DS_PYTHON = HERE / ".venv-deepspeed" / "bin" / "python"
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_DIR = HERE / "results"

SIZES = {  # vocab 256; context 64 and micro-batch 4 per rank unless given
    "small": {"n_layer": 2, "n_embd": 128, "n_head": 4},
    "medium": {"n_layer": 4, "n_embd": 256, "n_head": 4},
    # the reference setting: a 3.2-3.7M-parameter GPT whose DDP step takes ~200 ms on this machine
    "medium-b8x128": {"n_layer": 4, "n_embd": 256, "n_head": 4, "block": 128, "micro": 8},
    "large": {"n_layer": 6, "n_embd": 512, "n_head": 8},
}
CURVE_RTOL = {"fp32": 1e-4, "bf16": 2e-2}


@dataclass(frozen=True)
class Row:
    """One engine configuration."""

    label: str
    engine: str  # ddp | fsdp2 | fsdp2-full | shardwise | deepspeed
    stage: int = 0
    precision: str = "fp32"
    offload: bool = False
    tuned: bool = False  # DeepSpeed with HF's "auto" bucket sizes and overlap_comm instead of its defaults


def all_rows() -> list[Row]:
    rows = [Row("DDP", "ddp"), Row("FSDP2 reshard_after_forward=False (ZeRO-2 analogue)", "fsdp2"),
            Row("FSDP2 full shard (ZeRO-3 analogue)", "fsdp2-full"),
            Row("FSDP2 bf16 params, reshard_after_forward=False", "fsdp2", precision="bf16")]
    for engine, name in (("shardwise", "shardwise"), ("deepspeed", "DeepSpeed")):
        for precision in ("fp32", "bf16"):
            for stage in (0, 1, 2, 3):
                rows.append(Row(f"{name} stage {stage} {precision}", engine, stage, precision))
            for stage in (1, 2, 3):
                rows.append(Row(f"{name} stage {stage} {precision} + offload", engine, stage, precision, True))
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(row: Row, size: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The launcher command line of one row."""
    worker = [str(WORKER), "--engine", row.engine, "--stage", str(row.stage), "--precision", row.precision,
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out)]
    worker += [f"--{k}={v}" for k, v in SIZES[size].items()]
    if row.offload:
        worker.append("--offload")
    if row.tuned:
        worker.append("--tuned")
    port = str(_free_port())
    if row.engine == "shardwise":
        launcher = Path(sys.executable).with_name("shardwise")
        return [str(launcher), "--num_gpus", "2", "--master_port", port, *worker]
    python = str(args.ds_python) if row.engine == "deepspeed" else sys.executable
    return [python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, *worker]


def run_row(row: Row, size: str, args: argparse.Namespace) -> dict:
    """Run one row as its own 2-rank job; returns the worker's JSON, or an ``error`` entry."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "SHARDWISE_ACCELERATOR": "cpu",
           "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = command(row, size, args, out)
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            return {"error": f"exit {proc.returncode}: {tail}"}
        result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def measure(rows: list[Row], sizes: list[str], args: argparse.Namespace) -> list[dict]:
    """Every (size, row) for ``args.rounds`` rounds in rotated order; keeps each row's best run."""
    best: dict[tuple[str, str], dict] = {}
    history: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for size in sizes:
            others = [r for r in rows if r.engine != "ddp"]
            shift = rnd % max(1, len(others))
            ddp = [r for r in rows if r.engine == "ddp"]
            # DDP (the baseline every ratio divides by) runs first and last, so a load change mid-round shows up
            order = ddp + others[shift:] + others[:shift] + ddp
            for row in order:
                key = (size, row.label)
                result = run_row(row, size, args)
                status = f"{result['median_step_s'] * 1e3:8.1f} ms" if "error" not in result else "FAILED"
                print(f"[round {rnd + 1}/{args.rounds}] {size:<6} {row.label:<55} {status}", flush=True)
                if "error" in result:
                    print("    " + result["error"].replace("\n", "\n    "), flush=True)
                    best.setdefault(key, {"size": size, **asdict(row), **result})
                    continue
                history.setdefault(key, []).append(result["median_step_s"])
                previous = best.get(key)
                if previous is None or "error" in previous or result["median_step_s"] < previous["median_step_s"]:
                    best[key] = {"size": size, **asdict(row), **result}
    for key, medians in history.items():
        best[key]["round_medians_s"] = medians
    return [best[(size, row.label)] for size in sizes for row in rows if (size, row.label) in best]


def add_ratios(results: list[dict]) -> None:
    """Step-time and RSS ratios to DDP, and each loss curve's largest relative gap to DDP's, per size."""
    for size in {r["size"] for r in results}:
        ddp = next((r for r in results if r["size"] == size and r["engine"] == "ddp" and "error" not in r), None)
        if ddp is None:
            continue
        for r in results:
            if r["size"] != size or "error" in r:
                continue
            r["time_vs_ddp"] = r["median_step_s"] / ddp["median_step_s"]
            r["rss_vs_ddp"] = max(r["peak_rss_bytes"]) / max(ddp["peak_rss_bytes"])
            gaps = [abs(a - b) / abs(b) for a, b in zip(r["loss_curve"], ddp["loss_curve"])]
            r["loss_gap"] = max(gaps) if gaps else 0.0
            r["loss_agrees"] = r["loss_gap"] <= CURVE_RTOL[r["precision"]]


def targets(results: list[dict]) -> list[str]:
    """The issue's targets, checked row by row (stage 1/2 vs DDP; shardwise vs DeepSpeed's same configuration)."""
    lines = []
    ok = [r for r in results if "error" not in r and "time_vs_ddp" in r]
    for r in ok:
        if r["engine"] == "shardwise" and r["stage"] in (1, 2) and r["precision"] == "fp32" and not r["offload"]:
            t, m = r["time_vs_ddp"] <= 1.10, r["rss_vs_ddp"] <= 1.10
            lines.append(f"{r['size']}: {r['label']}: step {r['time_vs_ddp']:.3f}x DDP ({'met' if t else 'MISSED'}"
                         f", target <= 1.10x); peak RSS {r['rss_vs_ddp']:.2f}x DDP ({'met' if m else 'MISSED'}, "
                         "target <= 1.10x)")
        if r["engine"] == "shardwise" and r["stage"] == 3 and r["precision"] == "fp32" and not r["offload"]:
            t = r["time_vs_ddp"] <= 1.25
            fsdp = next((d for d in ok if d["engine"] == "fsdp2-full" and d["size"] == r["size"]), None)
            vs = ""
            if fsdp is not None:
                vs = (f"; vs FSDP2 full shard: {fsdp['median_step_s'] / r['median_step_s']:.2f}x "
                      f"{'faster' if r['median_step_s'] < fsdp['median_step_s'] else 'SLOWER'}, "
                      f"{max(fsdp['peak_rss_bytes']) / max(r['peak_rss_bytes']):.2f}x "
                      f"{'leaner' if max(r['peak_rss_bytes']) < max(fsdp['peak_rss_bytes']) else 'HEAVIER'}")
            lines.append(f"{r['size']}: {r['label']}: step {r['time_vs_ddp']:.3f}x DDP ({'met' if t else 'MISSED'}, "
                         f"target <= 1.25x){vs}")
        if r["engine"] != "shardwise":
            continue
        twin = next((d for d in ok if d["engine"] == "deepspeed" and d["size"] == r["size"] and d["stage"] ==
                     r["stage"] and d["precision"] == r["precision"] and d["offload"] == r["offload"]), None)
        if twin is not None:
            faster = r["median_step_s"] < twin["median_step_s"]
            leaner = max(r["peak_rss_bytes"]) < max(twin["peak_rss_bytes"])
            lines.append(f"{r['size']}: {r['label']} vs DeepSpeed: {twin['median_step_s'] / r['median_step_s']:.2f}x "
                         f"{'faster' if faster else 'SLOWER'}, "
                         f"{max(twin['peak_rss_bytes']) / max(r['peak_rss_bytes']):.2f}x "
                         f"{'leaner' if leaner else 'HEAVIER'} (peak RSS)")
    return lines


def markdown(results: list[dict], args: argparse.Namespace, notes: list[str]) -> str:
    """The "## Training" section of RESULTS.md."""
    out = ["## Training", "",
           f"`python benchmarks/bench_train.py {shlex.join(args.argv)}`".replace(" `", "`"), "",
           "GPT (`shardwise.models.GPT`, vocab 256, context 64 and micro-batch 4 per rank unless the size name says "
           "otherwise, e.g. `b8x128` = micro-batch 8, context 128), 2 ranks on gloo, 1 thread "
           "per rank, AdamW lr 1e-3 + clipping 1.0 everywhere, every other setting at the engine's default. Step = "
           "forward + backward + optimizer step (the slower rank), median of the measured steps, best of "
           f"{args.rounds} round(s). RSS = peak resident memory of the larger rank. Comm = bytes per step per rank: "
           "message size (the full buffer each collective is about) / ring wire bytes. Loss gap = largest relative "
           "difference from DDP's loss curve over all steps.", ""]
    out += [f"> {n}" for n in notes] + ([""] if notes else [])
    out += ["Method notes:", "",
            "- Optimizers: DDP `torch.optim.AdamW(fused=True)` (torch's fastest on CPU); FSDP2 `torch.optim.AdamW()` "
            "on DTensors; shardwise and DeepSpeed build what their `\"AdamW\"` config section gives: shardwise's "
            "fused C AdamW (CPU Adam with offload), DeepSpeed's FusedAdam CPU op (DeepSpeedCPUAdam with offload).",
            "- Communication: every torch.distributed collective is wrapped in the worker before the engine is "
            "imported (outermost call counted); DDP's C++ reducer is given torch's stock `allreduce_hook` so that "
            "its bucket all-reduce goes through the wrapped function. On gloo, shardwise's all-gather and "
            "reduce-scatter are point-to-point messages to each peer (`shardwise/comm/direct.py`), so the wrapper "
            "sees sends and their message bytes equal their wire bytes; shardwise's own comms log, which records "
            "them as the collectives they are, agrees on the wire bytes (`comms_log_*` in results/train.json).",
            "- `start MB` is the peak RSS before the model is built (Python + torch + the process group): what "
            "every engine pays before holding any model state.", ""]
    for size in dict.fromkeys(r["size"] for r in results):
        rows = [r for r in results if r["size"] == size]
        params = next((r["params"] for r in rows if "params" in r), 0)
        out += [f"### {size}: {params / 1e6:.2f}M parameters", "",
                "| engine | step ms | x DDP | peak RSS MB | x DDP | start MB | comm MB/step (msg / wire) | loss gap |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['label']} | failed | | | | | | |")
                continue
            gap = f"{r.get('loss_gap', 0):.1e}" + ("" if r.get("loss_agrees", True) else " (DISAGREES)")
            out.append(f"| {r['label']} | {r['median_step_s'] * 1e3:.0f} | {r.get('time_vs_ddp', float('nan')):.2f}"
                       f" | {max(r['peak_rss_bytes']) / 2**20:.0f} | {r.get('rss_vs_ddp', float('nan')):.2f} | "
                       f"{max(r.get('start_rss_bytes', [0])) / 2**20:.0f} | "
                       f"{r['comm_msg_bytes_per_step'] / 1e6:.1f} / {r['comm_wire_bytes_per_step'] / 1e6:.1f} | "
                       f"{gap} |")
        out.append("")
    out += ["![training benchmark](results/train.png)", "",
            "Where the ZeRO time goes relative to DDP (gloo's ring all-gather and reduce-scatter; backward "
            "prefetch at stage 3) and what closed the gap: see benchmarks/README.md.", "", "Targets (issues 3 and 4):",
            ""]
    out += [f"- {line}" for line in targets(results)] + [""]
    return "\n".join(out)


def write_section(section: str, path: Path = RESULTS_MD) -> None:
    """Replace (or append) the "## Training" section, keeping everything else in the file."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\nOne section per benchmark.\n"
    pattern = re.compile(r"^## Training\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip() + "\n\n", text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.write_text(text.rstrip() + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="small,medium", help=f"comma-separated, from {list(SIZES)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15, help="measured steps per row")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 round of 6 measured steps")
    ap.add_argument("--only", default=None, help="regex on row labels (DDP always runs: it is the baseline)")
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--ds-python", type=Path, default=DS_PYTHON)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per row (DeepSpeed JIT-builds ops once)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and results/ alone")
    ap.add_argument("--note", action="append", default=[], help="a line to put above the tables")
    ap.add_argument("--from-json", type=Path, default=None, help="re-render RESULTS.md and the plot from a saved "
                    "results/train.json instead of measuring")
    args = ap.parse_args(argv)
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--from-json" in shown:  # the command that measured, not the one that re-rendered
        i = shown.index("--from-json")
        del shown[i : i + 2]
    args.argv = shown
    if args.quick:
        args.rounds, args.steps = 1, 6
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    rows = all_rows()
    notes = list(args.note)
    if args.only:
        rows = [r for r in rows if r.engine == "ddp" or re.search(args.only, r.label)]
    if args.no_deepspeed or not args.ds_python.exists():
        rows = [r for r in rows if r.engine != "deepspeed"]
        if not args.no_deepspeed:
            notes.append(f"DeepSpeed rows skipped: {args.ds_python} not found (run benchmarks/setup_deepspeed_env.sh)")
    results = json.loads(args.from_json.read_text()) if args.from_json else measure(rows, sizes, args)
    add_ratios(results)
    section = markdown(results, args, notes)
    print("\n" + section)
    if not args.no_write:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "train.json").write_text(json.dumps(results, indent=1))
        write_section(section)
        try:
            from plot import plot_training

            plot_training(results, RESULTS_DIR / "train.png")
        except ImportError as exc:  # matplotlib is a dev extra
            print(f"no plot ({exc}); pip install matplotlib")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
