"""Plots for benchmarks/RESULTS.md (matplotlib, a dev extra).

    python benchmarks/plot.py                      # re-draw results/train.png from results/train.json

``plot_training`` draws one row of panels per model size: step time as a ratio to DDP, peak RSS per rank as a ratio
to DDP (the 1.10 target line on both), and the loss curves of every engine over the steps (they must overlap).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLORS = {"ddp": "black", "fsdp2": "tab:green", "fsdp2-full": "tab:olive", "shardwise": "tab:blue",
          "deepspeed": "tab:red"}


def plot_training(results: list[dict], png: Path) -> None:
    """Write the training benchmark figure to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r and "time_vs_ddp" in r]
    sizes = list(dict.fromkeys(r["size"] for r in ok))
    if not sizes:
        return
    fig, axes = plt.subplots(len(sizes), 3, figsize=(18, 6.5 * len(sizes)), squeeze=False)
    for row_axes, size in zip(axes, sizes):
        rows = [r for r in ok if r["size"] == size]
        labels = [r["label"] for r in rows]
        colors = [COLORS.get(r["engine"], "gray") for r in rows]
        ypos = range(len(rows))
        for ax, key, title in ((row_axes[0], "time_vs_ddp", "median step time / DDP"),
                               (row_axes[1], "rss_vs_ddp", "peak RSS per rank / DDP")):
            ax.barh(ypos, [r[key] for r in rows], color=colors)
            ax.axvline(1.0, color="black", lw=0.8)
            ax.axvline(1.10, color="gray", ls="--", lw=0.8)
            ax.set_yticks(list(ypos))
            ax.set_yticklabels(labels if ax is row_axes[0] else [], fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{size} ({rows[0]['params'] / 1e6:.2f}M params): {title}", fontsize=9)
        ax = row_axes[2]
        for r in rows:
            style = "-" if r["precision"] == "fp32" else ":"
            ax.plot(r["loss_curve"], style, color=COLORS.get(r["engine"], "gray"), lw=0.8, alpha=0.7)
        ax.set_title(f"{size}: loss per step (solid fp32, dotted bf16; all engines)", fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results" / "train.json"
    plot_training(json.loads(source.read_text()), source.with_suffix(".png"))
