"""The worked plans of docs/scale.md: LLaMA-7B / 70B / 405B on 8, 64 and 1,024 H100s, and the plausibility runs.

Run:  python benchmarks/plan_examples.py            (~5-10 minutes on 2 busy cores; one process, plans in turn)
      python benchmarks/plan_examples.py --only 70B (layouts whose name contains the text)

Every row is ``shardwise.plan.plan_layout`` on the h100-sxm profile, sequence 4096 unless stated, bf16, AdamW.
Writes ``benchmarks/results/plan_examples.md`` (the table docs/scale.md quotes) and ``plan_examples.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shardwise.plan import plan_layout
from shardwise.plan.report import traffic_by_link

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def ds(stage: int, mb: int = 1, gas: int = 1, **zero: Any) -> dict[str, Any]:
    """A bf16 AdamW ds_config."""
    return {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": {"stage": stage, **zero}}


CPU = {"device": "cpu"}
HPZ = {"zero_hpz_partition_size": 8}
PARTITION = {"activation_checkpointing": {"partition_activations": True}}
LAYOUTS: list[tuple[str, str, int, dict[str, Any]]] = [
    ("7B x 8: ZeRO-3", "llama-7b", 8, {"ds_config": ds(3)}),
    ("7B x 8: DDP (stage 0)", "llama-7b", 8, {"ds_config": ds(0)}),
    ("7B x 64: ZeRO-3 + hpZ, mb 2", "llama-7b", 64, {"ds_config": ds(3, mb=2, **HPZ)}),
    ("7B x 1024: ZeRO-3 + hpZ", "llama-7b", 1024, {"ds_config": ds(3, **HPZ)}),
    ("70B x 8: ZeRO-3, ckpt", "llama-70b", 8, {"ds_config": ds(3), "checkpoint_activations": True}),
    ("70B x 8: ZeRO-3 + optimizer offload, ckpt", "llama-70b", 8,
     {"ds_config": ds(3, offload_optimizer=CPU), "checkpoint_activations": True}),
    ("70B x 64: ZeRO-3 + hpZ, ckpt", "llama-70b", 64, {"ds_config": ds(3, **HPZ), "checkpoint_activations": True}),
    ("70B x 64: tp 8 x pp 4 x dp 2, ZeRO-1, ckpt", "llama-70b", 64,
     {"ds_config": ds(1, gas=16), "tp": 8, "pp": 4, "checkpoint_activations": True}),
    ("70B x 1024: tp 8 x pp 4 x dp 32 + SP, ZeRO-1, ckpt", "llama-70b", 1024,
     {"ds_config": ds(1, gas=16), "tp": 8, "pp": 4, "sequence_parallel": True, "checkpoint_activations": True}),
    ("405B x 8: ZeRO-3 + param & optimizer offload, ckpt", "llama-405b", 8,
     {"ds_config": ds(3, offload_optimizer=CPU, offload_param=CPU), "checkpoint_activations": True}),
    ("405B x 64: tp 8 x pp 8, ZeRO-1, ckpt", "llama-405b", 64,
     {"ds_config": ds(1, gas=16), "tp": 8, "pp": 8, "sequence_parallel": True, "checkpoint_activations": True}),
    ("405B x 64: tp 8 x dp 8, ZeRO-3 + optimizer offload, ckpt + partition", "llama-405b", 64,
     {"ds_config": {**ds(3, offload_optimizer=CPU), **PARTITION}, "tp": 8, "checkpoint_activations": True}),
    ("405B x 1024: tp 8 x pp 16 x dp 8 + SP, ZeRO-1, ckpt", "llama-405b", 1024,
     {"ds_config": ds(1, gas=64), "tp": 8, "pp": 16, "sequence_parallel": True, "checkpoint_activations": True}),
    ("405B x 1024: ZeRO-3 + hpZ, ckpt", "llama-405b", 1024,
     {"ds_config": ds(3, **HPZ), "checkpoint_activations": True}),
    # plausibility runs
    ("[torchtitan] Llama-3.1-8B x 8: ZeRO-3, seq 8192", "llama3-8b", 8, {"ds_config": ds(3), "seq_len": 8192}),
    ("[torchtitan] Llama-3.1-8B x 8: ZeRO-3, seq 8192, ckpt", "llama3-8b", 8,
     {"ds_config": ds(3), "seq_len": 8192, "checkpoint_activations": True}),
    ("[ZeRO++] 7B x 64: ZeRO-3", "llama-7b", 64, {"ds_config": ds(3, gas=2)}),
    ("[ZeRO++] 7B x 64: ZeRO-3 + hpZ", "llama-7b", 64, {"ds_config": ds(3, gas=2, **HPZ)}),
    ("[ZeRO++] 7B x 64: ZeRO-3 + hpZ + qwZ + qgZ", "llama-7b", 64,
     {"ds_config": ds(3, gas=2, zero_quantized_weights=True, zero_quantized_gradients=True, **HPZ)}),
]


def _row(name: str, plan: Any) -> dict[str, Any]:
    worst = max(plan.ranks, key=lambda r: r.peak)
    timed = [r for r in plan.ranks if r.step is not None]
    slow = max(timed, key=lambda r: r.step.step_s).step
    inter = max(traffic_by_link(r.probe.traffic)["inter"] for r in plan.ranks)
    return {"layout": name, "fits": plan.fits, "peak_gib": worst.peak / GIB, "rank": worst.probe.rank,
            "model_states_gib": sum(worst.device_states.values()) / GIB,
            "activations_gib": (worst.peak - sum(worst.device_states.values()) - sum(worst.buffers.values())) / GIB,
            "buffers_gib": sum(worst.buffers.values()) / GIB, "host_gib": worst.host_states / GIB,
            "inter_node_gb": inter / 1e9, "step_s": slow.step_s, "tokens_per_s": slow.tokens_per_s_per_device,
            "mfu": slow.mfu, "bubble": plan.pipeline.bubble, "arithmetic": worst.arithmetic,
            "seconds": plan.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    rows = []
    for name, model, world, kw in LAYOUTS:
        if args.only not in name:
            continue
        rows.append(_row(name, plan_layout(model, world, **kw)))
        r = rows[-1]
        print(f"{name}: {'fits' if r['fits'] else 'DOES NOT FIT'}, peak {r['peak_gib']:.1f} GiB, step "
              f"{r['step_s']:.2f} s, MFU {100 * r['mfu']:.1f}% ({r['seconds']:.0f} s)", flush=True)
    lines = ["| layout | fits | peak GiB = states + activations + buffers | host GiB/GPU | inter-node GB/step/GPU "
             "| step s | tokens/s/GPU | MFU |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {'yes' if r['fits'] else '**no**'} | {r['peak_gib']:.1f} = "
                     f"{r['model_states_gib']:.1f} + {r['activations_gib']:.1f} + {r['buffers_gib']:.1f} | "
                     f"{r['host_gib']:.1f} | {r['inter_node_gb']:.1f} | {r['step_s']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |")
    out = ROOT / "benchmarks" / "results"
    (out / "plan_examples.md").write_text("\n".join(lines) + "\n")
    (out / "plan_examples.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
