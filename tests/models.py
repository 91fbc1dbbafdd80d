"""Test models, deterministic per-rank data, and the single-process float64 reference trainer.

Every parallel layout is checked against the same oracle: a plain single-process copy of the model in float64,
fed the global batch (all ranks' micro-batches of a step), with the same optimizer and schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardwise.models import GPT, GPTConfig

DATA_SEED = 1234


def tiny_mlp(seed: int = 0, width: int = 16, depth: int = 3) -> nn.Module:
    """A small MLP regression model (a few hundred parameters), identical for a given seed."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(8 if i == 0 else width, width))
        layers.append(nn.Tanh())
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers)


TINY_GPT = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_transformer(seed: int = 0, cfg: GPTConfig = TINY_GPT) -> GPT:
    """A tiny GPT (tied embeddings), identical for a given seed."""
    torch.manual_seed(seed)
    return GPT(cfg)


def rank_batch(step: int, rank: int, micro: int = 0, kind: str = "mlp", batch: int = 4,
               cfg: GPTConfig = TINY_GPT) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs for (step, micro-step, data-parallel rank): different per rank, reproducible anywhere."""
    g = torch.Generator().manual_seed(DATA_SEED + 100_003 * step + 1_009 * micro + rank)
    if kind == "mlp":
        x = torch.randn(batch, 8, generator=g)
        return x, torch.randn(batch, 4, generator=g)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def global_batch(step: int, dp: int, gas: int, **kw: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every micro-batch of one optimizer step, over all ranks (what the reference model sees)."""
    return [rank_batch(step, r, m, **kw) for r in range(dp) for m in range(gas)]


def mse_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of an MLP's prediction."""
    return F.mse_loss(model(x), y)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a GPT."""
    return model(x, y)


def reference_train(model: nn.Module, steps: int, dp: int, gas: int, optimizer_fn: Callable, *,
                    loss_fn: Callable = mse_loss, scheduler_fn: Callable | None = None, clip: float = 0.0,
                    dtype: torch.dtype = torch.float64, **batch_kw: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train a copy of ``model`` on one process on the global batches; returns per-step losses and final weights."""
    ref = copy.deepcopy(model).to(dtype)
    opt = optimizer_fn(ref.parameters())
    sched = scheduler_fn(opt) if scheduler_fn else None
    losses = []
    for step in range(steps):
        batches = global_batch(step, dp, gas, **batch_kw)
        x = torch.cat([b[0] for b in batches]).to(dtype if batches[0][0].is_floating_point() else batches[0][0].dtype)
        y = torch.cat([b[1] for b in batches])
        y = y.to(dtype) if y.is_floating_point() else y
        loss = loss_fn(ref, x, y)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in ref.state_dict().items()}


def assert_close_rel(actual: torch.Tensor | float, expected: torch.Tensor | float, rtol: float = 1e-5,
                     atol: float = 1e-6, what: str = "") -> None:
    """``torch.testing.assert_close`` in float64 with the suite's stated tolerances."""
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_state_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-5,
                       what: str = "") -> None:
    """Every tensor within ``rtol`` of ``expected`` relative to the tensor's magnitude: max|a-e| <= rtol * max|e|.

    Element-wise relative error is meaningless for elements near zero after Adam steps (Adam turns rounding noise of
    near-zero gradients into lr-sized moves; plain fp32 PyTorch differs from float64 there by the same amount), so
    transformer parity is stated per tensor, against single-process fp32 PyTorch.
    """
    assert actual.keys() == expected.keys(), f"{what}: keys differ: {sorted(set(actual) ^ set(expected))}"
    for name, e in expected.items():
        a = actual[name].double()
        e = e.double()
        err = (a - e).abs().max().item() if e.numel() else 0.0
        scale = e.abs().max().item() if e.numel() else 0.0
        assert err <= rtol * scale + 1e-12, f"{what} {name}: max |diff| {err:.3g} > {rtol:g} x max |ref| {scale:.3g}"
