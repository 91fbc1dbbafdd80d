"""Loss curves and model-state bytes with 16-bit master weights / optimizer states against fp32 masters.

Run:  python benchmarks/bench_low_precision.py            (150 steps per mode)
      python benchmarks/bench_low_precision.py --quick    (20 steps: checks the benchmark works)

Every mode trains the same small GPT (tests/models.py's GPT, 4 layers, width 64, vocabulary 256, sequence 32) from
the same initialisation on 2 gloo ranks, ZeRO-2, AdamW lr 3e-3, clipping 1.0, on 8 fixed batches per rank repeated
(so the loss keeps falling), and records the loss of every step (averaged over the ranks) and
``engine.memory_breakdown()``. Modes:

* ``bf16, fp32 master``: DeepSpeed's default bf16 (fp32 master partition, fp32 Adam states);
* ``bf16 master + bf16 states``: ``bf16_master_weights_and_grads`` + ``bf16_optimizer_states``;
* ``bf16 master, offload``: ``bf16_master_weights_and_grads`` with CPU offload (fp32 states on the host);
* ``fp16, fp32 master`` and ``fp16 master, offload``: the same for fp16 (loss-scaled).

Loss values are not timings: measuring on a loaded machine changes nothing. Writes
``benchmarks/results/low_precision.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "low_precision.md"
MODES = {
    "bf16, fp32 master": ("bf16", {}, False),
    "bf16 master + bf16 states": ("bf16", {"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True},
                                  False),
    "bf16 master, offload (fp32 states)": ("bf16", {"bf16_master_weights_and_grads": True}, True),
    "fp16, fp32 master": ("fp16", {}, False),
    "fp16 master, offload (fp32 states)": ("fp16", {"fp16_master_weights_and_grads": True}, True),
}
NOTE = ("\nThe 16-bit-master rows fall behind the fp32-master row slowly rather than by noise: an update "
        "smaller than half a 16-bit ulp of its weight is lost (bf16 keeps 8 mantissa bits, fp16 11; rounded to "
        "nearest, no stochastic rounding), so the bf16 rows lose more than the fp16 one. Master and optimizer-state "
        "bytes are exactly halved (bf16 states) or moved to the host (offload).\n")


def train_rank(precision: str, block: dict, offload: bool, steps: int) -> dict:
    """Train on this rank; returns the per-step losses (mean over ranks) and the memory breakdown."""
    import torch

    import shardwise
    from shardwise import comm
    from tests.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=4, n_head=4, n_embd=64)
    model = GPT(cfg)
    zero: dict = {"stage": 2}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    extra = {"initial_scale_power": 12} if precision == "fp16" else {}
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
              "zero_optimization": zero, precision: {"enabled": True, **block, **extra}, "steps_per_print": 10**6}
    engine, _, _, _ = shardwise.initialize(model=model, config=config)
    rank = engine.topology.coord("dp")
    g = torch.Generator().manual_seed(1000 + rank)
    data = [torch.randint(0, cfg.vocab_size, (8, cfg.block_size + 1), generator=g) for _ in range(8)]
    losses = []
    for step in range(steps):
        tokens = data[step % len(data)]
        loss = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        total = loss.detach().float().clone()
        comm.all_reduce(total)
        losses.append(total.item() / engine.dp_world_size)
    return {"losses": losses, "memory": engine.memory_breakdown(),
            "params": sum(p.numel() for p in engine.module.parameters())}


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 steps per mode")
    args = ap.parse_args(argv)
    from tests.dist import run_ranks

    steps = 20 if args.quick else 150
    results = {}
    for name, (precision, block, offload) in MODES.items():
        results[name] = run_ranks(train_rank, precision, block, offload, steps, world_size=2, timeout=3600)[0]
        print(f"{name}: loss {results[name]['losses'][0]:.4f} -> {results[name]['losses'][-1]:.4f}", flush=True)
    marks = [s for s in (1, 10, 25, 50, 100, 150) if s <= steps]
    params = next(iter(results.values()))["params"]
    lines = [f"{params:,} parameters, 2 ranks, ZeRO-2, {steps} steps; loss (mean over ranks) at step:", "",
             "| mode | " + " | ".join(str(s) for s in marks) + " | max rel. diff vs fp32 master | master bytes/rank "
             "| optimizer-state bytes/rank | device model states/rank |",
             "|---|" + "---|" * len(marks) + "---|---|---|---|"]
    for name, res in results.items():
        ref = results[f"{name[:4]}, fp32 master"]["losses"]
        worst = max(abs(a - b) / abs(b) for a, b in zip(res["losses"], ref))
        mem = res["memory"]
        device = mem["parameters"] + mem["gradients"] + (0 if "offload" in name else
                                                         mem["master_weights"] + mem["optimizer_states"])
        where = " (host)" if "offload" in name else ""
        lines.append(f"| {name} | " + " | ".join(f"{res['losses'][s - 1]:.4f}" for s in marks)
                     + f" | {worst:.2%} | {mem['master_weights']:,}{where} | {mem['optimizer_states']:,}{where} "
                     f"| {device:,} |")
    text = "\n".join(lines) + "\n" + NOTE
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
