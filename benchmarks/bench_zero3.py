"""ZeRO-3 memory and ZeRO++ communication, measured (the same measurements the tests assert, with the numbers).

Run from the repository root: ``python benchmarks/bench_zero3.py`` (about a minute). Writes
``benchmarks/results/zero3.md``; ``python benchmarks/collect_results.py`` puts it into RESULTS.md.

* ``zero.Init``: peak RSS growth per rank while building a 128 MiB model on 4 ranks, against its 1/4 share.
* NVMe offload: per-rank model-state bytes and resident set after three steps, with and without
  ``offload_param`` + ``offload_optimizer`` on NVMe (files), 2 ranks, a 4.2M-parameter MLP.
* hpZ: bytes that cross the boundary between two modelled nodes of two ranks, per step, flat ZeRO-3 vs hpZ.
* qwZ / qgZ: bytes of the quantized collectives against the exact ones, and the loss drift over 8 steps.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.dist import run_ranks  # noqa: E402
from tests.distributed import test_zero3_init as init_test  # noqa: E402
from tests.distributed import test_zero3_offload as offload_test  # noqa: E402
from tests.distributed import test_zero3_zeropp as zeropp_test  # noqa: E402


def _init_rows() -> list[str]:
    res = run_ranks(init_test._build_big_model_in_init, world_size=4, timeout=180)
    full = init_test.LAYERS * init_test.WIDTH**2 * 4 / 2**20
    rows = ["| rank | share held MB | peak RSS growth MB | full model MB |", "|---:|---:|---:|---:|"]
    rows += [f"| {r} | {x['held']:.1f} | {x['peak']:.1f} | {full:.0f} |" for r, x in enumerate(res)]
    return rows


def _offload_rows() -> list[str]:
    base = run_ranks(offload_test._resident_after_steps, None, world_size=2)[0]
    with tempfile.TemporaryDirectory(prefix="sw-nvme-") as path:
        nvme = run_ranks(offload_test._resident_after_steps, path, world_size=2)[0]
    return ["| configuration | model-state MB per rank | resident set after 3 steps MB |", "|---|---:|---:|",
            f"| ZeRO-3 | {base['model_state_mb']:.1f} | {base['rss_mb']:.0f} |",
            f"| ZeRO-3 + offload_param nvme + offload_optimizer nvme | {nvme['model_state_mb']:.1f} | "
            f"{nvme['rss_mb']:.0f} |"]


def _hpz_rows() -> list[str]:
    env = zeropp_test.TWO_NODES
    flat = run_ranks(zeropp_test._train, {}, zeropp_test.STEPS, True, world_size=4, env=env)[0]
    hpz = run_ranks(zeropp_test._train, {"zero_hpz_partition_size": 2}, zeropp_test.STEPS, True, world_size=4,
                    env=env)[0]
    return ["| layout (4 ranks = 2 nodes x 2) | cross-node bytes per step per rank | all bytes per step per rank |",
            "|---|---:|---:|",
            f"| flat ZeRO-3 | {flat['cross']:,.0f} | {flat['total']:,.0f} |",
            f"| hpZ (zero_hpz_partition_size 2) | {hpz['cross']:,.0f} | {hpz['total']:,.0f} |",
            "", f"Cross-node bytes {flat['cross'] / hpz['cross']:.2f}x lower with hpZ (float64 model: "
            f"{flat['numel']:,} elements)."]


def _quant_rows() -> list[str]:
    exact = run_ranks(zeropp_test._train, {}, 8, world_size=2)[0]
    rows = ["| variant | all-gather bytes/step | reduction bytes/step | max loss drift vs exact (8 steps) |",
            "|---|---:|---:|---:|",
            f"| exact | {exact['by_op']['all_gather']:,.0f} | {exact['by_op']['reduce_scatter']:,.0f} | - |"]
    for name, zero in (("qwZ", {"zero_quantized_weights": True}), ("qgZ", {"zero_quantized_gradients": True}),
                       ("qwZ + qgZ", {"zero_quantized_weights": True, "zero_quantized_gradients": True})):
        q = run_ranks(zeropp_test._train, zero, 8, world_size=2)[0]
        drift = max(abs(a - b) / abs(b) for a, b in zip(q["losses"], exact["losses"]))
        reduction = q["by_op"].get("reduce_scatter", 0.0) + q["by_op"].get("all_to_all", 0.0)
        rows.append(f"| {name} | {q['by_op']['all_gather']:,.0f} | {reduction:,.0f} | {drift:.2e} |")
    return rows


def main() -> int:
    """Measure and write results/zero3.md."""
    parts = ["# ZeRO-3", "", "2-4 gloo ranks on this 2-core CPU machine (one thread per rank).", "",
             "### zero.Init: building a 33.6M-parameter (128 MiB) model on 4 ranks", "", *_init_rows(), "",
             "### NVMe offload: what stays resident", "", *_offload_rows(), "",
             "### hpZ: bytes across the node boundary", "", *_hpz_rows(), "",
             "### qwZ / qgZ: quantized collectives (tiny GPT, 2 ranks, bytes on the wire)", "", *_quant_rows(), ""]
    out = HERE / "results" / "zero3.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(parts))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
