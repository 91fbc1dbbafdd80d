"""``shardwise-plot RUN_DIR``: draw a run's monitor events as PNG files (loss, learning rate, throughput, memory and
the step-time breakdown).

RUN_DIR is a ``csv_monitor`` job directory (``output_path/job_name`` with one ``<event>.csv`` per event), a
TensorBoard log directory (``events.out.tfevents.*`` files, read with TensorBoard's own EventAccumulator), or any
directory above them: every event file found below it is read, and when both kinds hold the same event the CSV
values are used. The figures go to ``RUN_DIR/plots/`` (or ``--out``); the x axis is the global sample count the
events are keyed by. Needs matplotlib (``pip install "shardwise[plot]"``), and tensorboard for event files.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Sequence
from pathlib import Path

Series = dict[str, list[tuple[int, float]]]

#: figure name -> (title, y label, event-name suffixes drawn on it)
FIGURES = {
    "loss": ("training loss", "loss", ("train_loss", "eval_loss")),
    "lr": ("learning rate", "lr", ("lr",)),
    "throughput": ("throughput", "samples / s", ("samples_per_second",)),
    "memory": ("peak memory (highest rank)", "MB", ("peak_memory_MB",)),
    "step_time": ("step time breakdown", "ms", ("elapsed_time_ms_forward", "elapsed_time_ms_backward",
                                                "elapsed_time_ms_step")),
}


def read_csv_dir(directory: Path) -> Series:
    """Every ``<event>.csv`` of a csv_monitor directory: ``{event name: [(step, value), ...]}``. The event name is
    rebuilt from the file name (``Train_Samples_lr`` -> ``Train/Samples/lr`` for DeepSpeed's ``Train/...`` events)."""
    out: Series = {}
    for path in sorted(directory.glob("*.csv")):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0][:1] != ["step"]:
            continue
        points = [(int(r[0]), float(r[1])) for r in rows[1:] if len(r) >= 2 and r[0] != "step"]
        out[_event_name(path.stem, rows[0][1] if len(rows[0]) > 1 else path.stem)] = points
    return out


def _event_name(stem: str, last: str) -> str:
    if stem.endswith(last):
        head = stem[: -len(last)].rstrip("_")
        return f"{head.replace('_', '/')}/{last}" if head else last
    return stem


def read_tensorboard_dir(directory: Path) -> Series:
    """Every scalar of the TensorBoard event files in ``directory`` (TensorBoard's EventAccumulator)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as exc:
        raise SystemExit(f"{directory} holds TensorBoard event files; reading them needs tensorboard: "
                         f'pip install "shardwise[tensorboard]" ({exc})') from exc
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def read_run(run_dir: Path) -> Series:
    """All events below ``run_dir`` (CSV values win over TensorBoard's for the same event)."""
    series: Series = {}
    tb_dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
    for d in tb_dirs:
        series.update(read_tensorboard_dir(d))
    for d in sorted({p.parent for p in run_dir.rglob("*.csv")}):
        series.update(read_csv_dir(d))
    return {k: sorted(v) for k, v in series.items() if v}


def plot_run(series: Series, out_dir: Path) -> list[Path]:
    """One PNG per figure that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, ylabel, suffixes) in FIGURES.items():
        lines = {k: v for k, v in series.items() if k.split("/")[-1] in suffixes}
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, points in sorted(lines.items()):
            marker = "." if len(points) < 50 else None
            ax.plot([s for s, _ in points], [v for _, v in points], label=label, marker=marker)
        ax.set_title(title)
        ax.set_xlabel("samples")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """The ``shardwise-plot`` console script."""
    parser = argparse.ArgumentParser(prog="shardwise-plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a csv_monitor or tensorboard job directory (or a directory above them)")
    parser.add_argument("--out", default=None, help="where the PNG files go (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        parser.error(f"{run_dir} is not a directory; pass the csv_monitor/tensorboard output_path/job_name")
    series = read_run(run_dir)
    if not series:
        parser.error(f"no monitor events under {run_dir} (looked for <event>.csv and events.out.tfevents.* files); "
                     'enable "csv_monitor" or "tensorboard" in the ds_config')
    try:
        written = plot_run(series, Path(args.out) if args.out else run_dir / "plots")
    except ImportError as exc:
        parser.error(f'plotting needs matplotlib: pip install "shardwise[plot]" ({exc})')
    for path in written:
        print(os.fspath(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
