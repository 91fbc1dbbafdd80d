"""Per-rank peak memory of one training step of an unmodified Hugging Face Llama vs sequence length, with and
without Ulysses sequence parallelism (sp=2) and the tiled loss; and the longest sequence that fits a memory budget.

Run:  python benchmarks/bench_sp_memory.py                 (sequence lengths 1K-16K; minutes, GBs of RAM)
      python benchmarks/bench_sp_memory.py --quick         (256-1K: checks the benchmark works)
      python benchmarks/bench_sp_memory.py --budget-mb 2000   (+ the longest sequence per mode within 2000 MB)

Every measurement is a fresh job (1 rank for the single-process rows, 2 gloo ranks for sp=2), one thread per rank:
build the model (fp32, ``attn_implementation="sdpa"``), reset the peak resident set (``/proc/self/clear_refs``),
run forward + backward of one batch of one sequence, and report the peak RSS growth over the step (the activations,
logits, gradients; CPU memory is the process's RSS), the larger of the ranks. Modes:

* ``1 rank``: the model's own loss on the full sequence (full ``seq x vocab`` logits, and their fp32 copy);
* ``1 rank + tiled loss``: base model + ``tiled_cross_entropy_sum`` (logits in chunks of <= 64 MB);
* ``sp=2``: ``register_with_transformers`` + ``UlyssesSPDataLoaderAdapter``; each rank holds half the sequence;
* ``sp=2 + tiled loss``: both.

The logits column is the analytic size of one rank's full logits (seq/sp x vocab x 4 bytes), what tiling avoids.
Writes ``benchmarks/results/sp_memory.md``. On a shared machine RSS is exact but time is noisy.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "sp_memory.md"
MODEL = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=1 << 20)
MODES = {"1 rank": (1, False), "1 rank + tiled loss": (1, True), "sp=2": (2, False), "sp=2 + tiled loss": (2, True)}
CHUNK_BYTES = 64 * 2**20


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages so RSS deltas mean something
    except OSError:
        pass


def memory_rank(seq: int, sp: int, tiled: bool) -> dict:
    """One training step on this rank; returns the peak RSS growth (bytes), the step time and the loss."""
    import transformers as tf

    from shardwise.accelerator import get_accelerator
    from shardwise.sp import (
        UlyssesSPAttentionHF,
        UlyssesSPDataLoaderAdapter,
        sequence_parallel_mean,
        tiled_cross_entropy_sum,
    )

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(attn_implementation="sdpa", use_cache=False, **MODEL))
    ids = torch.randint(0, MODEL["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone()}
    group = None
    if sp > 1:
        mpu = UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", sp, 1)
        group = mpu.get_sequence_parallel_group()
        adapter = UlyssesSPDataLoaderAdapter([batch], mpu.get_sequence_parallel_rank(), group, sp, "cpu")
        batch = next(adapter)
    else:
        batch = {"input_ids": ids, "shift_labels": torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]}
    acc = get_accelerator()
    _trim()
    acc.reset_peak_memory_stats()
    base = acc.memory_allocated()
    start = time.perf_counter()
    labels = batch["shift_labels"]
    inputs = {k: batch[k] for k in ("input_ids", "position_ids") if k in batch}
    if tiled:
        hidden = model.model(**inputs).last_hidden_state
        loss_sum = tiled_cross_entropy_sum(hidden, model.lm_head, labels, chunk_bytes=CHUNK_BYTES)[0]
    else:
        loss_sum = model(**inputs, labels=labels, shift_labels=labels, num_items_in_batch=1).loss
    loss = sequence_parallel_mean(loss_sum, (labels != -100).sum(), group)
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = acc.max_memory_allocated() - base
    if sp > 1:
        UlyssesSPAttentionHF.unregister_from_transformers()
    return {"peak": peak, "time": elapsed, "loss": loss.item()}


def measure(seq: int, mode: str) -> dict:
    """Run one mode at one sequence length in a fresh job; the worst rank's numbers."""
    from tests.dist import run_ranks

    sp, tiled = MODES[mode]
    this = sys.modules[__name__].__spec__.name if __spec__ else "benchmarks.bench_sp_memory"
    fn = __import__(this, fromlist=["memory_rank"]).memory_rank
    res = run_ranks(fn, seq, sp, tiled, world_size=sp, timeout=3600)
    return {"peak": max(r["peak"] for r in res), "time": max(r["time"] for r in res), "loss": res[0]["loss"]}


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def longest_within(budget: int, mode: str, start: int, limit: int) -> int:
    """The longest power-of-two multiple of ``start`` whose step fits ``budget`` bytes (0 if none)."""
    best, seq = 0, start
    while seq <= limit:
        if measure(seq, mode)["peak"] > budget:
            break
        best, seq = seq, seq * 2
    return best


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short sequences (checks the benchmark works)")
    ap.add_argument("--seqs", type=int, nargs="*", help="sequence lengths (default 1K-16K, quick 256-1K)")
    ap.add_argument("--modes", nargs="*", choices=list(MODES), help="modes to measure (default: all four)")
    ap.add_argument("--budget-mb", type=float, help="also find the longest sequence per mode within this budget")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    seqs = args.seqs or ([256, 512, 1024] if args.quick else [1024, 2048, 4096, 8192, 16384])
    lines = [f"Peak RSS growth per rank over one training step (forward + backward), HF Llama {MODEL}, fp32, sdpa, "
             f"batch 1, torch {torch.__version__}, one thread per rank; tiled loss in chunks of <= "
             f"{_mb(CHUNK_BYTES)} MB of logits.", "",
             "| seq | mode | peak MB / rank | full logits MB / rank | step s | loss |",
             "|---:|---|---:|---:|---:|---:|"]
    for seq in seqs:
        for mode in args.modes or MODES:
            sp = MODES[mode][0]
            r = measure(seq, mode)
            logits = seq // sp * MODEL["vocab_size"] * 4
            lines.append(f"| {seq} | {mode} | {_mb(r['peak'])} | {_mb(logits)} | {r['time']:.2f} | "
                         f"{r['loss']:.4f} |")
            print(lines[-1], flush=True)
    if args.budget_mb:
        budget = int(args.budget_mb * 2**20)
        lines += ["", f"Longest sequence (power of two from {seqs[0]}) whose step fits {args.budget_mb:g} MB "
                  "per rank:",
                  "", "| mode | longest seq |", "|---|---:|"]
        for mode in args.modes or MODES:
            lines.append(f"| {mode} | {longest_within(budget, mode, seqs[0], 1 << 22)} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
