"""Gradient fix-ups that tensor and sequence parallelism need from the engine, expressed through fragments.

* Weights that live in the sequence-parallel region (LayerNorm/RMSNorm weights when Megatron sequence parallelism
  is on, marked ``param.sequence_parallel = True``) see only their rank's sequence shard, so their gradients must be
  summed over the tensor-parallel group before the optimizer step (Megatron's ``allreduce_sequence_parallel_grads``).
* The global gradient norm must count weights replicated across tensor ranks once. A weight split by tensor
  parallelism carries ``param.tensor_model_parallel = True`` (Megatron's attribute); everything else is replicated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardwise import comm


def _owned_grads(strategy: Any, params: list[nn.Parameter]) -> list[torch.Tensor]:
    out = []
    for p in params:
        for frag in strategy.fragments(p):
            if frag.grad is not None and frag.numel:
                out.append(frag.grad)
    return out


def sync_sequence_parallel_grads(strategy: Any, module: nn.Module, topology: Any) -> None:
    """Sum the gradients of ``sequence_parallel`` weights over the tensor-parallel group (one all-reduce)."""
    tp = topology.tp_group
    if tp.size == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]
    grads = _owned_grads(strategy, params)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group=tp)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def replicated_norm_sq(strategy: Any, module: nn.Module) -> torch.Tensor:
    """Squared norm of this rank's gradient pieces of weights replicated across tensor-parallel ranks."""
    params = [p for p in module.parameters() if p.requires_grad and not getattr(p, "tensor_model_parallel", False)]
    grads = _owned_grads(strategy, params)
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    return sum(g.double().pow(2).sum() for g in grads)
