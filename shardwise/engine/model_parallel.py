"""Gradient fix-ups that tensor and sequence parallelism need from the engine, expressed through fragments.

* Weights that live in the sequence-parallel region (LayerNorm/RMSNorm weights when Megatron sequence parallelism
  is on, marked ``param.sequence_parallel = True``) see only their rank's sequence shard, so their gradients must be
  summed over the tensor-parallel group before the optimizer step (Megatron's ``allreduce_sequence_parallel_grads``).
* The global gradient norm must count weights replicated across tensor ranks once. A weight split by tensor
  parallelism carries ``param.tensor_model_parallel = True`` (Megatron's attribute); everything else is replicated.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shardwise import comm

if TYPE_CHECKING:
    from shardwise.comm.topology import Topology
    from shardwise.engine.strategy import ShardingStrategy



def _owned_grads(strategy: ShardingStrategy, params: list[nn.Parameter]) -> list[torch.Tensor]:
    out = []
    for p in params:
        for frag in strategy.fragments(p):
            if frag.grad is not None and frag.numel:
                out.append(frag.grad)
    return out


_layout_checked: weakref.WeakSet = weakref.WeakSet()


def _check_same_fragments(strategy: ShardingStrategy, params: list[nn.Parameter], tp: Any) -> None:
    """Once per strategy: the flat all-reduce below pairs element i of every tensor rank's fragment list, which is
    only right if every tensor rank owns the same ranges of the same sequence-parallel weights. That holds when the
    tensor-parallel shards have equal shapes on all ranks (even splits); uneven splits shift ZeRO's flat layout."""
    if strategy in _layout_checked:
        return
    mine = [(i, f.start, f.end) for i, p in enumerate(params) for f in strategy.fragments(p) if f.numel]
    layouts = comm.all_gather_object(mine, group=tp)
    if any(layout != layouts[0] for layout in layouts):
        raise RuntimeError(
            "the ZeRO partitions of the sequence-parallel weights differ between tensor-parallel ranks (their "
            "tensor-parallel shards have different shapes, i.e. an uneven split), so their gradients cannot be "
            "summed over the tensor group; use a tensor-parallel degree that divides every split dimension when "
            "combining sequence parallelism with ZeRO stages 1-2"
        )
    _layout_checked.add(strategy)


def sync_sequence_parallel_grads(strategy: ShardingStrategy, module: nn.Module, topology: Topology) -> None:
    """Sum the gradients of ``sequence_parallel`` weights over the tensor-parallel group (one all-reduce)."""
    tp = topology.tp_group
    if tp.size == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad and getattr(p, "sequence_parallel", False)]
    if params:
        _check_same_fragments(strategy, params, tp)
    grads = _owned_grads(strategy, params)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, group=tp)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def replicated_params(module: nn.Module) -> list[nn.Parameter]:
    """Trainable weights not split by tensor parallelism (identical on every tensor-parallel rank)."""
    return [p for p in module.parameters() if p.requires_grad and not getattr(p, "tensor_model_parallel", False)]


def grad_norm_sq(strategy: ShardingStrategy, params: list[nn.Parameter]) -> torch.Tensor:
    """Squared norm (float64) of this rank's gradient pieces of ``params``."""
    grads = _owned_grads(strategy, params)
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    return sum(g.double().pow(2).sum() for g in grads)
