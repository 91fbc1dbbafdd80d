"""Gather every benchmark's table into ``benchmarks/RESULTS.md``.

``bench_train.py`` writes the "## Training" section itself; the other benchmarks write ``results/<name>.md``.
This script keeps the Training section and replaces everything after it with the other files, in a fixed order,
each under its own heading. Run it after any benchmark: ``python benchmarks/collect_results.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTIONS = [  # (heading, results file, the command that produces it)
    ("Collectives on gloo", "collectives.md", "python benchmarks/bench_collectives.py"),
    ("CPU Adam", "cpu_adam.md", "python benchmarks/bench_cpu_adam.py"),
    ("ZeRO-3 memory and ZeRO++ communication", "zero3.md", "python benchmarks/bench_zero3.py"),
    ("Checkpoints", "checkpoint.md", "python benchmarks/bench_checkpoint.py"),
    ("Tensor parallelism and activation memory", "tp.md", "python benchmarks/bench_tp.py"),
    ("Ulysses sequence parallelism: memory per rank", "sp_memory.md",
     "python benchmarks/bench_sp_memory.py --budget-mb 2000"),
    ("AutoTP training of a Hugging Face model (issue 18)", "autotp_train.md",
     "python benchmarks/bench_autotp_train.py"),
    ("Pipeline parallelism", "pipe.md", "python benchmarks/bench_pipe.py"),
    ("Inference", "inference.md", "python benchmarks/bench_inference.py"),
    ("16-bit master weights", "low_precision.md", "python benchmarks/bench_low_precision.py"),
    ("Deterministic mode", "determinism.md", "python benchmarks/bench_determinism.py"),
    ("Hugging Face Trainer backends", "hf_trainer.md", "python benchmarks/bench_hf_trainer.py"),
    ("Real sizes (issue 22)", "real_sizes_issue22.md",
     "python benchmarks/bench_nvme_large.py; python benchmarks/bench_real_size.py"),
]


def _body(text: str) -> str:
    """A results file without its own top-level title (the section heading replaces it)."""
    lines = text.strip().splitlines()
    while lines and (lines[0].startswith("# ") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(re.sub(r"^(#+) ", r"\1## ", line) if line.startswith("#") else line for line in lines)


def main() -> int:
    """Rewrite RESULTS.md: title, the Training section, then one section per results file."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    match = re.search(r"^## Training\n.*?(?=^## (?!#)|\Z)", current, flags=re.S | re.M)
    training = match.group(0).rstrip() if match else "## Training\n\n(run `python benchmarks/bench_train.py`)"
    head = current[: match.start()] if match else "# Benchmark results\n\n"
    parts = [head.rstrip(), "", training, ""]
    for heading, name, command in SECTIONS:
        path = HERE / "results" / name
        if path.exists():
            parts += [f"## {heading}", "", f"`{command}`", "", _body(path.read_text()), ""]
    RESULTS.write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
