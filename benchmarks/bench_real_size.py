"""Training at real model sizes (issue 22 item 1): GPT-2-small shape (124M) and a ~374M LLaMA on 2 CPU ranks, seq
256, micro-batch 1: shardwise ZeRO 0/1/2/3 and ZeRO-3 + CPU offload against DDP, FSDP2 (full shard and
``reshard_after_forward=False``) and DeepSpeed 0.19.8 (default buckets, and "tuned": the bucket sizes HF Trainer
writes for "auto" from the hidden size h, ``reduce_bucket_size`` h^2, ``stage3_prefetch_bucket_size`` 0.9 h^2,
``stage3_param_persistence_threshold`` 10 h, with ``overlap_comm`` and ``contiguous_gradients`` on; shardwise is
run with the same tuned config too), fp32 and bf16.

Run:

    python benchmarks/bench_real_size.py --quick                       # smoke test: tiny shapes, 1 step, few rows
    python benchmarks/bench_real_size.py --sizes gpt124m --precisions fp32 --rounds 2
    python benchmarks/bench_real_size.py --sizes llama374m --only 'DDP|FSDP2 full|stage 3 fp32$'

It reuses ``bench_train.py``'s machinery: each row is a fresh 2-rank job of ``train_worker.py`` under its engine's
own launcher, rows run in ``--rounds`` rounds in rotated order (DDP first and last) and each row keeps its best
round, so one noisy round cannot decide a row. The machine may be shared: the load average is recorded before and
after every row (``load`` in the JSON) and the table shows it. DeepSpeed runs from ``--ds-python`` (a venv with
deepspeed 0.19.8; rows skipped when absent).

Reported per row: median step time (slower rank) of the measured steps, tokens/s (2 ranks x micro-batch x seq /
step), ratio to DDP measured in the same run, peak RSS per rank (``ru_maxrss``), bytes communicated per step per rank
(message / ring-wire), and the largest relative gap of the loss curve from DDP's. Writes
``benchmarks/results/real_size.json``, ``real_size.md`` and ``real_size.png`` (step time and peak RSS vs size).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_train  # noqa: E402  (the shared harness: rows, launchers, rounds)
from bench_train import Row  # noqa: E402

DS_PYTHON = Path("/work/venvs/ds22/bin/python")
RESULTS_DIR = HERE / "results"
SIZES = {
    "gpt124m": {"model": "gpt", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab": 50257, "block": 256, "micro": 1},
    "llama374m": {"model": "llama", "n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab": 32000, "block": 256,
                  "micro": 1},
    # --quick: the same code paths at toy scale
    "gpt-tiny": {"model": "gpt", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab": 512, "block": 64, "micro": 1},
    "llama-tiny": {"model": "llama", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab": 512, "block": 64, "micro": 1},
}


def rows(precisions: list[str]) -> list[Row]:
    """Every configuration of the issue, in the precisions asked for."""
    out = [Row("DDP", "ddp")]
    for precision in precisions:
        p = "" if precision == "fp32" else " bf16"
        out += [Row(f"FSDP2 full shard{p}", "fsdp2-full", precision=precision),
                Row(f"FSDP2 reshard_after_forward=False{p}", "fsdp2", precision=precision)]
        for engine, name in (("shardwise", "shardwise"), ("deepspeed", "DeepSpeed")):
            for stage in (0, 1, 2, 3):
                out.append(Row(f"{name} stage {stage} {precision}", engine, stage, precision))
            out.append(Row(f"{name} stage 3 {precision} + CPU offload", engine, 3, precision, True))
        for stage in (1, 2, 3):  # both engines with what HF Trainer writes for "auto" buckets, overlap_comm on
            for engine, name in (("shardwise", "shardwise"), ("deepspeed", "DeepSpeed")):
                out.append(Row(f"{name} stage {stage} {precision} tuned", engine, stage, precision, tuned=True))
    return out


def measure_with_load(selected: list[Row], sizes: list[str], args: argparse.Namespace) -> list[dict]:
    """``bench_train.measure`` with the load average recorded around every row run."""
    original = bench_train.run_row

    def run_row(row: Row, size: str, a: argparse.Namespace) -> dict:
        before = Path("/proc/loadavg").read_text().split()[0]
        result = original(row, size, a)
        result.setdefault("load", []).append([before, Path("/proc/loadavg").read_text().split()[0]])
        return result

    bench_train.run_row = run_row
    try:
        return bench_train.measure(selected, sizes, args)
    finally:
        bench_train.run_row = original


def merge(stored: list[dict], fresh: list[dict]) -> list[dict]:
    """``fresh`` rows replace the stored rows of the same size and label, except the DDP baseline, which every run
    measures: its best run over all merged runs is kept (with every run's medians), like any row's best round."""
    by_key = {(r["size"], r["label"]): r for r in stored}
    for r in fresh:
        key = (r["size"], r["label"])
        old = by_key.get(key)
        if r["engine"] == "ddp" and old is not None and "error" not in old and "error" not in r:
            medians = old.get("round_medians_s", [old["median_step_s"]]) + r.get("round_medians_s", [])
            r = dict(min(old, r, key=lambda x: x["median_step_s"]), round_medians_s=medians)
        by_key[key] = r
    return list(by_key.values())


def markdown(results: list[dict], command: str) -> str:
    """The tables, one per size."""
    out = [f"`{command}`", ""]
    for size in dict.fromkeys(r["size"] for r in results):
        group = [r for r in results if r["size"] == size]
        shape = SIZES[size]
        params = next((r["params"] for r in group if "params" in r), 0)
        tokens = 2 * shape["micro"] * shape["block"]
        out += [f"#### {size}: {params / 1e6:.1f}M parameters ({shape['model']}, seq {shape['block']}, micro-batch "
                f"{shape['micro']}, 2 ranks)", "",
                "| engine | step s | tokens/s | x DDP | peak RSS MB (rank 0 / 1) | comm MB/step (msg / wire) | "
                "loss gap | rounds: step s | load (before/after) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in group:
            if "error" in r:
                lines = [x for x in r["error"].strip().splitlines() if x.strip(" =-")]
                reason = (lines[-1] if lines else "?")[:120].replace("|", "/")
                out.append(f"| {r['label']} | failed: {reason} | | | | | | | |")
                continue
            rss = " / ".join(f"{b / 2**20:.0f}" for b in r["peak_rss_bytes"])
            loads = ", ".join(f"{a}/{b}" for a, b in r.get("load", []))
            rounds = ", ".join(f"{m:.2f}" for m in r.get("round_medians_s", [r["median_step_s"]]))
            gap = f"{r.get('loss_gap', 0):.1e}" + ("" if r.get("loss_agrees", True) else " (differs)")
            out.append(f"| {r['label']} | {r['median_step_s']:.2f} | {tokens / r['median_step_s']:.0f} | "
                       f"{r.get('time_vs_ddp', float('nan')):.2f} | {rss} | "
                       f"{r['comm_msg_bytes_per_step'] / 1e6:.0f} / {r['comm_wire_bytes_per_step'] / 1e6:.0f} | "
                       f"{gap} | {rounds} | {loads} |")
        out.append("")
    return "\n".join(out)


def plot(results: list[dict], path: Path) -> None:
    """Step time and peak RSS vs model size, one line per engine configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r and "params" in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for label in dict.fromkeys(r["label"] for r in ok):
        pts = sorted((r["params"] / 1e6, r["median_step_s"], max(r["peak_rss_bytes"]) / 2**30)
                     for r in ok if r["label"] == label)
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1] for p in pts], marker="o", label=label)
        axes[1].plot(xs, [p[2] for p in pts], marker="o", label=label)
    axes[0].set(xlabel="parameters (M)", ylabel="step time (s, best round)", title="step time, 2 CPU ranks")
    axes[1].set(xlabel="parameters (M)", ylabel="peak RSS per rank (GiB)", title="peak RSS (larger rank)")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="gpt124m,llama374m")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--only", default=None, help="regex on row labels (DDP always runs: the baseline)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="measured steps per row")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 round, 1 measured step, a few rows")
    ap.add_argument("--ds-python", type=Path, default=DS_PYTHON)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    ap.add_argument("--merge", action="store_true", help="add to (replace matching rows of) results/real_size.json")
    ap.add_argument("--plot-only", action="store_true", help="re-render md/png from results/real_size.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    bench_train.SIZES.update(SIZES)
    store = RESULTS_DIR / "real_size.json"
    if args.plot_only:
        results = json.loads(store.read_text())
    else:
        sizes = [s for s in args.sizes.split(",") if s]
        precisions = [p for p in args.precisions.split(",") if p]
        if args.quick:
            sizes, args.rounds, args.steps = ["gpt-tiny", "llama-tiny"], 1, 1
            args.only = args.only or "FSDP2 full shard$|shardwise stage 3 fp32$|DeepSpeed stage 3 fp32$"
        unknown = [s for s in sizes if s not in SIZES]
        if unknown:
            raise SystemExit(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
        selected = [r for r in rows(precisions) if r.engine == "ddp" or not args.only or re.search(args.only, r.label)]
        if not args.ds_python.exists():
            print(f"DeepSpeed rows skipped: {args.ds_python} not found", flush=True)
            selected = [r for r in selected if r.engine != "deepspeed"]
        results = measure_with_load(selected, sizes, args)
        for r in results:
            r["command"] = "python benchmarks/bench_real_size.py " + " ".join(argv)
        if args.quick:
            bench_train.add_ratios(results)
            print(markdown(results, results[0]["command"]))
            return 0 if all("error" not in r for r in results) else 1
        if args.merge and store.exists():
            results = merge(json.loads(store.read_text()), results)
    bench_train.add_ratios(results)
    RESULTS_DIR.mkdir(exist_ok=True)
    store.write_text(json.dumps(results, indent=1))
    commands = "; ".join(dict.fromkeys(r.get("command", "") for r in results))
    text = markdown(results, commands)
    (RESULTS_DIR / "real_size.md").write_text(text + "\n")
    print(text)
    try:
        plot(results, RESULTS_DIR / "real_size.png")
    except ImportError as exc:
        print(f"no plot ({exc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
