"""Pipeline test models and their single-process reference, shared by the pipeline tests and benchmark.

``pair_mlp_specs(depth)`` is a small MLP written as pipeline layers whose stage boundaries carry a tuple
``(hidden, skip, counter)``: two float tensors that both require grad and an int64 tensor that does not, so every
boundary exercises tuples, requires-grad flags and non-float tensors. Layer 2 and layer ``3 + depth`` share one
bias-free weight (a ``TiedLayerSpec``; the second use multiplies by its transpose), so with 2+ stages the tie spans
stages. ``reference_module(specs)`` builds the same layers with the same seeds as one single-stage
``PipelineModule`` in this process (no torch.distributed), whose parameter names equal the pipeline's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardwise.comm.topology import Topology
from shardwise.pipe import LayerSpec, PipelineModule, TiedLayerSpec

BASE_SEED = 1234


class PairLinear(nn.Module):
    """``(h, skip, n) -> (tanh(W h + b), skip, n + 1)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, t: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, skip, n = t
        return torch.tanh(self.lin(h)), skip, n + 1


def fork(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Start carrying a skip connection and a per-sample counter."""
    return torch.tanh(x), x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)


def tied_in(m: nn.Module, t: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """First use of the tied weight: ``h W^T``."""
    return torch.tanh(m(t[0])), t[1], t[2]


def tied_out(m: nn.Module, t: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Second use of the tied weight: ``h W`` (the transpose)."""
    return torch.tanh(t[0] @ m.weight), t[1], t[2]


def join(t: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Merge the skip connection, scaled by the counter (an int tensor that crossed the stages)."""
    h, skip, n = t
    return h + skip * (n.to(h.dtype).unsqueeze(1) / 10.0)


def pair_mlp_specs(depth: int = 1, width: int = 16) -> list[Any]:
    """``3 + depth + 2`` layers: Linear, fork, tied, depth x PairLinear, tied^T, join... (see module docstring)."""
    specs: list[Any] = [LayerSpec(nn.Linear, 8, width), fork,
                        TiedLayerSpec("mid", nn.Linear, width, width, bias=False, forward_fn=tied_in)]
    specs += [LayerSpec(PairLinear, width) for _ in range(depth)]
    specs += [TiedLayerSpec("mid", nn.Linear, width, width, bias=False, forward_fn=tied_out), join,
              LayerSpec(nn.Linear, width, 4)]
    return specs


def single_rank_topology() -> Topology:
    """A one-rank grid that creates no process groups (works with or without torch.distributed)."""
    return Topology(world_size=1, rank=0, create_groups=False)


def reference_module(specs: list[Any], **kw: Any) -> PipelineModule:
    """All layers on one stage, same seeds as the pipeline run: the reference model."""
    return PipelineModule(specs, topology=single_rank_topology(), seed_layers=True, base_seed=BASE_SEED,
                          partition_method="uniform", **kw)


def mse_loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``reference_train``'s loss signature for a layer-list model."""
    return F.mse_loss(model(x), y)


def micro_batches(step: int, dp_rank: int, gas: int, batch_fn: Callable) -> list[Any]:
    """The ``(inputs, labels)`` micro-batches one data-parallel replica trains on at ``step``."""
    return [batch_fn(step, dp_rank, m) for m in range(gas)]
