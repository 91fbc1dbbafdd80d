"""The engine on CUDA at ZeRO stages 0-3 in bf16, fp16 and fp32, one rank (nccl), against plain PyTorch on the GPU.

The reference is the same tiny GPT trained in plain fp32 PyTorch on the same device (``torch.optim.AdamW``, the
same clipping and batches). Stated tolerances, every step's loss relative to the reference (as in
``tests/distributed/test_precision.py``): bf16 2% (8-bit mantissa weights and activations), fp16 1% (11-bit
mantissa, loss-scaled), fp32 1e-4 (TF32 off: torch's default for matmuls). Weights are compared in fp32 on a small
MLP (1e-5 relative, as the CPU suite states for fp32): the GPT's key bias gets only rounding noise as gradient
(softmax ignores it), which Adam turns into lr-sized moves in any two implementations.
"""

from __future__ import annotations

import functools

import pytest
import torch

import shardwise
from shardwise.accelerator import get_accelerator
from shardwise.zero import GatheredParameters
from tests.gpu.harness import ACCELERATOR, run_gpu
from tests.models import assert_close_rel, mse_loss, rank_batch, tiny_mlp, tiny_transformer

STEPS = 50
LR = 5e-3
CLIP = 1.0
CURVE_RTOL = {"fp32": 1e-4, "bf16": 0.02, "fp16": 0.01}
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _config(stage: int, precision: str) -> dict:
    cfg: dict = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
        # several buckets on the 28k elements; at stage 3 every parameter is partitioned (no persistent units)
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 4000, "stage3_param_persistence_threshold": 0},
    }
    if precision != "fp32":
        cfg[precision] = {"enabled": True}
    if precision == "fp16":
        cfg["fp16"]["initial_scale_power"] = 8  # no overflow-skipped step on this model (it would shift the curve)
    return cfg


def _batch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = rank_batch(step % 4, 0, kind="gpt", batch=8)  # 4 batches, repeated: the model can learn them
    return x.to(device), y.to(device)


@functools.cache
def _plain_pytorch(steps: int = STEPS) -> list[float]:
    """Plain fp32 PyTorch on the same device (this process): the loss of every step."""
    device = torch.device(ACCELERATOR)
    model = tiny_transformer(seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    losses = []
    for step in range(steps):
        loss = model(*_batch(step, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _train(stage: int, precision: str) -> dict:
    get_accelerator().reset_peak_memory_stats()
    engine, _, _, _ = shardwise.initialize(model=tiny_transformer(seed=0), config=_config(stage, precision))
    device = engine.device
    losses = []
    for step in range(STEPS):
        loss = engine(*_batch(step, device))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    params = list(engine.module.parameters())
    return {"losses": losses, "skipped": engine.skipped_steps,
            "device": {p.device.type for p in params}, "dtype": {p.dtype for p in params},
            "policy": engine.strategy.policy.name, "peak": get_accelerator().max_memory_allocated()}


def _train_stage(stage: int) -> dict:
    """Every precision of one stage, and the fp32 MLP, in one process (one CUDA start-up instead of four)."""
    out = {precision: _train(stage, precision) for precision in CURVE_RTOL}
    out["mlp"] = _mlp_train(stage)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_on_the_gpu_tracks_plain_pytorch(stage: int) -> None:
    (results,) = run_gpu(_train_stage, stage)
    ref_losses = _plain_pytorch()
    assert ref_losses[-1] < 0.7 * ref_losses[0], "the reference must learn, or the comparison says nothing"
    for precision, tol in CURVE_RTOL.items():
        r = results[precision]
        assert r["device"] == {ACCELERATOR} and r["dtype"] == {DTYPE[precision]}, (precision, r["device"], r["dtype"])
        assert r["skipped"] == 0, precision
        rel = [abs(a - b) / b for a, b in zip(r["losses"], ref_losses)]
        worst = max(rel)
        print(f"stage {stage} {precision} ({r['policy']}): worst loss gap {worst:.2e} at step {rel.index(worst)}, "
              f"peak {r['peak'] / 2**20:.1f} MiB")
        assert worst <= tol, f"{precision}: worst relative gap {worst:.4f} at step {rel.index(worst)}"
    _check_mlp(stage, results["mlp"])


# -- fp32 weights -----------------------------------------------------------------------------------------------------
MLP_STEPS = 6


def _mlp_batch(step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = rank_batch(step, 0, batch=8)
    return x.to(device), y.to(device)


def _mlp_cfg(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.05,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.01}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 200,
                                  "stage3_param_persistence_threshold": 0}}


def _mlp_train(stage: int) -> dict:
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=_mlp_cfg(stage))
    losses = []
    for step in range(MLP_STEPS):
        loss = mse_loss(engine, *_mlp_batch(step, engine.device))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with GatheredParameters(list(engine.module.parameters())):
        weights = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    return {"losses": losses, "weights": weights}


def _mlp_plain() -> tuple[list[float], dict[str, torch.Tensor]]:
    device = torch.device(ACCELERATOR)
    model = tiny_mlp(seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)  # DeepSpeed's "Adam": decoupled decay
    losses = []
    for step in range(MLP_STEPS):
        loss = mse_loss(model, *_mlp_batch(step, device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _check_mlp(stage: int, r: dict) -> None:
    """fp32 weights of the MLP against plain PyTorch on the same device."""
    ref_losses, ref_weights = _mlp_plain()
    assert_close_rel(r["losses"], ref_losses, what=f"stage {stage} losses")
    for name, value in ref_weights.items():
        assert_close_rel(r["weights"][name], value, what=f"stage {stage} {name}")
