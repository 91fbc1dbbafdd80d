"""How checkpoints see an engine's model: tensor names, tied aliases, which tensors a strategy manages, the
tensor-parallel slice a rank holds, and which ranks write what. Shared by save, load and ``save_16bit_model``.

Names are the keys of ``module.state_dict()`` (what users and DeepSpeed's files use). A pipeline engine whose stage
modules use local names can define ``checkpoint_named_tensors()`` returning ``(global_name, tensor, is_param)``
triples; everything else here works unchanged. Who writes:

* pieces of managed parameters (``strategy.fragments``): the ranks of the *first replica* of the state group (the
  one holding the ZeRO group's rank 0), so each element is written once per checkpoint;
* frozen parameters and buffers (replicated): ZeRO-group rank 0 only;
* with tensor parallelism, a tensor split across tensor ranks (``tensor_model_parallel``) is written by every tensor
  rank as its box; a replicated one by tensor rank 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shardwise import comm
from shardwise.checkpoint import regions

if TYPE_CHECKING:
    from shardwise.comm.topology import Topology
    from shardwise.engine.engine import Engine
    from shardwise.engine.strategy import ShardingStrategy



@dataclass
class ModelTensor:
    """One named tensor of the model as this rank holds it."""

    name: str
    tensor: torch.Tensor
    is_param: bool
    managed: bool  # its values live in the strategy's fragments (fp32 masters, optimizer state)
    shape: tuple[int, ...]  # full (unsliced, unpartitioned) shape
    boxes: list[regions.Box] | None  # tensor-parallel blocks this rank holds, concatenated along split_dim
    split_dim: int = 0

    @property
    def tp_split(self) -> bool:
        """Whether tensor parallelism splits this tensor."""
        return self.boxes is not None

    def runs(self, flat: tuple[int, int]) -> list[tuple[regions.Box | None, regions.Run]]:
        """Elements ``flat`` of this rank's local tensor as (saved box, run) pairs (see ``regions.local_runs``)."""
        if self.boxes is None:
            return [(None, regions.Run(0, flat, 0, 1, flat[1] - flat[0], flat[1] - flat[0]))]
        return [(self.boxes[r.box], r) for r in regions.local_runs(self.boxes, self.split_dim, flat)]


def run_view(values: torch.Tensor, run: regions.Run) -> torch.Tensor:
    """The elements of ``run`` inside ``values`` (1-D, the requested local range): a (rows, row_len) view."""
    if run.rows == 1:
        return values[run.start : run.start + run.row_len].view(1, run.row_len)
    span = values[run.start : run.start + (run.rows - 1) * run.stride + run.row_len]
    return span.unfold(0, run.row_len, run.stride)


def managed_ids(strategy: ShardingStrategy, params: list[torch.Tensor]) -> set[int]:
    """ids of the parameters whose values live in the strategy's fragments (collective over the state group).

    A partitioned parameter may have no fragment on this rank, so "has fragments on some rank of the state group"
    is the test: one small all-reduce, and it needs nothing from a strategy but ``fragments`` and ``state_group``.
    """
    if strategy is None or not params:
        return set()
    flags = torch.tensor([1 if strategy.fragments(p) else 0 for p in params], dtype=torch.int32)
    comm.all_reduce(flags, op=comm.ReduceOp.MAX, group=strategy.state_group)
    return {id(p) for p, flag in zip(params, flags.tolist()) if flag}


def _tp_layers(module: nn.Module) -> dict[int, tuple[int, list[tuple[int, int]], int]]:
    """id(param) -> (split dim, this rank's ranges along it, full size) from tensor-parallel layers (``shardwise.tp``:
    a module with ``split.ranges(rank)``, ``tp_rank`` and ``_split_params``), so uneven and fused splits are exact."""
    out = {}
    for m in module.modules():
        split, names = getattr(m, "split", None), getattr(m, "_split_params", None)
        if split is None or not names or not hasattr(split, "ranges"):
            continue
        for name, dim in names.items():
            p = getattr(m, name, None)
            if p is not None and getattr(m, "tp_world", 1) > 1:
                out[id(p)] = (dim, list(split.ranges(m.tp_rank)), split.total)
    return out


def _tp_boxes(t: torch.Tensor, topology: Topology, layers: dict) -> tuple[tuple[int, ...], list | None, int]:
    """(full shape, this rank's boxes or None, split dim) for a possibly tensor-parallel tensor."""
    local = tuple(getattr(t, "ds_shape", None) or t.shape)
    if id(t) in layers:
        dim, ranges, total = layers[id(t)]
    elif topology.size("tp") > 1 and getattr(t, "tensor_model_parallel", False):  # Megatron-style: even blocks
        dim, tp = int(getattr(t, "partition_dim", 0)), topology.size("tp")
        total = local[dim] * tp
        ranges = [regions.split_even(total, tp, topology.coord("tp"))]
    else:
        return local, None, 0
    full = list(local)
    full[dim] = total
    boxes = []
    for lo, hi in ranges:
        box = list(regions.full_box(full))
        box[dim] = (lo, hi)
        boxes.append(tuple(box))
    return tuple(full), boxes, dim


ModelView = tuple[list[ModelTensor], dict[str, str], dict[str, Any]]


def named_tensors(engine: Engine) -> ModelView:
    """The model's tensors (first name of each), tied aliases ``{alias: first name}``, and non-tensor extra state.

    Collective over the state group (see :func:`managed_ids`): every rank must call it.
    """
    custom = getattr(engine, "checkpoint_named_tensors", None)
    if custom is not None:
        triples = list(custom())
        extra: dict[str, Any] = {}
    else:
        params = {id(p) for p in engine.module.parameters()}
        triples, extra = [], {}
        for name, value in engine.module.state_dict(keep_vars=True).items():
            if torch.is_tensor(value):
                triples.append((name, value, id(value) in params))
            else:
                extra[name] = value
    unique, first, aliases = [], {}, {}
    for name, t, is_param in triples:
        if id(t) in first:
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        unique.append((name, t, is_param))
    managed = managed_ids(engine.strategy, [t for _, t, is_param in unique if is_param])
    layers = _tp_layers(engine.module) if engine.topology.size("tp") > 1 else {}
    out = []
    for name, t, is_param in unique:
        shape, boxes, dim = _tp_boxes(t, engine.topology, layers)
        out.append(ModelTensor(name, t, is_param, id(t) in managed, shape, boxes, dim))
    return out, aliases, extra


def writes_fragments(engine: Engine) -> bool:
    """Whether this rank belongs to the state-group replica that writes managed parameters' pieces."""
    strategy = engine.strategy
    if strategy is None:
        return False
    zero = engine.topology.zero_group
    return zero.global_rank(0) in strategy.state_group.ranks


def writes_replicated(engine: Engine) -> bool:
    """Whether this rank writes tensors every data-parallel rank holds in full (frozen weights, buffers)."""
    return engine.topology.zero_group.rank == 0


def writes_tensor(engine: Engine, mt: ModelTensor) -> bool:
    """Tensor-parallel rule: split tensors are written by every tensor rank, replicated ones by tensor rank 0."""
    return mt.tp_split or engine.topology.coord("tp") == 0
