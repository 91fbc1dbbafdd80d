"""Tensor-parallel layers: ``ColumnParallelLinear``, ``RowParallelLinear``, ``VocabParallelEmbedding``.

Each is a drop-in for ``nn.Linear`` / ``nn.Embedding`` (same forward signature, returns one tensor, parameters
named ``weight`` and ``bias``) whose weight is split over a tensor-parallel group, for any shape, with or without
bias, in any dtype. Splits may be uneven and fall on a ``grain`` (whole attention heads) and may cover fused
projections (``parts``: Q|K|V, gate|up); see ``partition.py``. ``from_linear`` / ``from_embedding`` build a layer
from an existing full module by slicing its weights (training from a pretrained model; inference auto-TP), and
``shard_full`` / ``gather_full`` convert single tensors between the full and this rank's layout.

Split weights carry Megatron's attributes ``tensor_model_parallel = True``, ``partition_dim`` and
``partition_stride`` (the engine's gradient-norm de-duplication reads them); weights whose gradient is computed on
a sequence shard carry ``sequence_parallel = True`` (the engine sums their gradients over the tensor group).
``group`` is a ``Group``, a torch ProcessGroup, a ``Topology`` (its tensor group) or ``None`` (no parallelism).
Sequence-parallel activations are ``[batch, seq, ...]`` (``sequence_dim = 1``; set the attribute to 0 for
Megatron's ``[seq, batch, ...]`` layout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardwise.tp import mappings as M
from shardwise.tp.partition import DimSplit


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int, stride: int = 1) -> nn.Parameter:
    """Tag ``param`` as split across tensor-parallel ranks along ``partition_dim`` (Megatron's attributes)."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride
    return param


def _slice(full: torch.Tensor, ranges: list[tuple[int, int]], dim: int) -> torch.Tensor:
    pieces = [full.narrow(dim, lo, hi - lo) for lo, hi in ranges]
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)).detach().clone()


class GroupRef:
    """Holds a process group so that ``copy.deepcopy(layer)`` shares it instead of copying a ProcessGroup."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> GroupRef:
        return self


class _Parallel(nn.Module):
    """What the three layers share: the group, this rank's index, the split, and full <-> local conversion."""

    sequence_dim: int = 1
    _split_params: dict[str, int] = {}  # parameter name -> dimension split across ranks

    @property
    def group(self) -> Any:
        """The tensor-parallel ``Group`` this layer is split over."""
        return self._group.value

    def _setup(self, group: Any, split: DimSplit | None, total: int, what: str) -> None:
        self._group = GroupRef(M.resolve_group(group))
        self.tp_world = self.group.size
        self.tp_rank = self.group.rank if self.tp_world > 1 else 0
        split = split if split is not None else DimSplit.of(total, self.tp_world)
        if split.world != self.tp_world or split.total != total:
            raise ValueError(f"{type(self).__name__}: the split covers {split.total} {what} over {split.world} ranks, "
                             f"but the layer has {total} {what} over a group of {self.tp_world}; build the split "
                             f"with DimSplit.of({total}, {self.tp_world}, ...)")
        self.split = split

    def shard_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the full tensor for parameter ``name`` (a copy; replicated tensors are cloned)."""
        dim = self._split_params.get(name)
        if dim is None:
            return full.detach().clone()
        return _slice(full, self.split.ranges(self.tp_rank), dim)

    def gather_full(self, name: str, local: torch.Tensor | None = None) -> torch.Tensor:
        """The full tensor of parameter ``name`` (collective over the group: every rank must call it)."""
        local = getattr(self, name).detach() if local is None else local
        dim = self._split_params.get(name)
        if dim is None or self.tp_world == 1:
            return local.clone()
        sizes = None if self.split.is_even() else self.split.sizes()
        full = M.all_gather_dim(local, self.group, dim, sizes)
        perm = self.split.gather_permutation()
        return full.index_select(dim, torch.tensor(perm, device=full.device)) if perm else full

    def load_full(self, **full: torch.Tensor | None) -> None:
        """Copy this rank's pieces of full tensors into the parameters, e.g. ``load_full(weight=w, bias=b)``."""
        with torch.no_grad():
            for name, tensor in full.items():
                if tensor is not None and getattr(self, name, None) is not None:
                    getattr(self, name).copy_(self.shard_full(name, tensor))

    def _adopt(self, full_module: nn.Module, names: Sequence[str]) -> None:
        """Replace (meta) parameters by slices of ``full_module``'s, keeping its device, dtype and requires_grad."""
        for name in names:
            src = getattr(full_module, name, None)
            if src is None or getattr(self, name, None) is None:
                continue
            old = getattr(self, name)
            new = nn.Parameter(self.shard_full(name, src.data), requires_grad=src.requires_grad)
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel"):
                if hasattr(old, attr):
                    setattr(new, attr, getattr(old, attr))
            setattr(self, name, new)


def _init_uniform(t: torch.Tensor, fan_in: int) -> None:
    """nn.Linear's default init, with the fan-in of the FULL layer (a shard must not change the distribution)."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(t, -bound, bound)


class ColumnParallelLinear(_Parallel):
    """``y = x A^T + b`` with A (and b) split along the output features: rank r computes its output slice.

    The input is replicated (backward all-reduces its gradient) or, with ``sequence_parallel``, a sequence shard
    all-gathered first (backward reduce-scatters). ``gather_output=True`` returns the full output; otherwise each
    rank returns its slice (``split.local_size(rank)`` features), ready for a ``RowParallelLinear``.
    """

    _split_params = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group: Any = None,
                 gather_output: bool = False, sequence_parallel: bool = False, split: DimSplit | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._setup(group, split, out_features, "output features")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        local = self.split.local_size(self.tp_rank)
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(local, in_features, dtype=dtype)), 0)
        self.bias = mark_tensor_parallel(nn.Parameter(torch.empty(local, dtype=dtype)), 0) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init with the distribution of the full ``nn.Linear``."""
        if self.weight.is_meta:
            return
        _init_uniform(self.weight, self.in_features)
        if self.bias is not None:
            _init_uniform(self.bias, self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Any, *, gather_output: bool = False, sequence_parallel: bool = False,
                    grain: int = 1, parts: Sequence[int] | None = None) -> ColumnParallelLinear:
        """This rank's column slice of an existing ``nn.Linear`` (``parts``: sizes of fused output blocks)."""
        g = M.resolve_group(group)
        split = DimSplit.of(linear.out_features, g.size, grain, parts)
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group=g,
                        gather_output=gather_output, sequence_parallel=sequence_parallel, split=split,
                        dtype=linear.weight.dtype)
        layer._adopt(linear, ("weight", "bias"))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = M.gather_from_sequence_parallel_region(x, self.group, self.sequence_dim)
        else:
            x = M.copy_to_tensor_model_parallel_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output and self.tp_world > 1:
            sizes = None if self.split.is_even() else self.split.sizes()
            y = M.gather_from_tensor_model_parallel_region(y, self.group, -1, sizes)
            perm = self.split.gather_permutation()
            if perm:
                y = y.index_select(-1, torch.tensor(perm, device=y.device))
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.weight.shape[0]}), tp={self.tp_world}, bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_Parallel):
    """``y = x A^T + b`` with A split along the input features: rank r multiplies its input slice, then the
    partial products are summed (all-reduce, or reduce-scatter along the sequence with ``sequence_parallel``).

    The bias is replicated and added once, after the reduction. ``input_is_parallel=False`` takes the full input
    and keeps this rank's slice first.
    """

    _split_params = {"weight": 1}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group: Any = None,
                 input_is_parallel: bool = True, sequence_parallel: bool = False, split: DimSplit | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._setup(group, split, in_features, "input features")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        local = self.split.local_size(self.tp_rank)
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(out_features, local, dtype=dtype)), 1)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        if self.bias is not None:
            self.bias.sequence_parallel = sequence_parallel  # its gradient is computed on a sequence shard
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init with the distribution of the full ``nn.Linear``."""
        if self.weight.is_meta:
            return
        _init_uniform(self.weight, self.in_features)
        if self.bias is not None:
            _init_uniform(self.bias, self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Any, *, input_is_parallel: bool = True,
                    sequence_parallel: bool = False, grain: int = 1,
                    parts: Sequence[int] | None = None) -> RowParallelLinear:
        """This rank's row slice (input features) of an existing ``nn.Linear``."""
        g = M.resolve_group(group)
        split = DimSplit.of(linear.in_features, g.size, grain, parts)
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group=g,
                        input_is_parallel=input_is_parallel, sequence_parallel=sequence_parallel, split=split,
                        dtype=linear.weight.dtype)
        layer._adopt(linear, ("weight", "bias"))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_world > 1:
            perm = self.split.gather_permutation()
            if perm:  # full layout -> rank-major layout, so that a plain split hands each rank its ranges
                order = [0] * len(perm)
                for full_index, pos in enumerate(perm):
                    order[pos] = full_index
                x = x.index_select(-1, torch.tensor(order, device=x.device))
            sizes = None if self.split.is_even() else self.split.sizes()
            x = M.scatter_to_tensor_model_parallel_region(x, self.group, -1, sizes)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = M.reduce_scatter_to_sequence_parallel_region(y, self.group, self.sequence_dim)
        else:
            y = M.reduce_from_tensor_model_parallel_region(y, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.weight.shape[1]}), out_features={self.out_features}, "
                f"tp={self.tp_world}, bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(_Parallel):
    """An embedding table split along the vocabulary: each rank looks up the ids it owns, zeros the others, and
    the partial embeddings are summed (all-reduce; reduce-scatter along the sequence with ``sequence_parallel``).
    """

    _split_params = {"weight": 0}

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, group: Any = None,
                 sequence_parallel: bool = False, split: DimSplit | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._setup(group, split, num_embeddings, "embeddings")
        if len(self.split.parts) != 1:
            raise ValueError("VocabParallelEmbedding splits one vocabulary; fused parts are not meaningful here")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.sequence_parallel = padding_idx, sequence_parallel
        self.vocab_start, self.vocab_end = self.split.ranges(self.tp_rank)[0]
        local = self.vocab_end - self.vocab_start
        self.weight = mark_tensor_parallel(nn.Parameter(torch.empty(local, embedding_dim, dtype=dtype)), 0)
        self.reset_parameters()

    @property
    def _local_padding_idx(self) -> int | None:
        p = self.padding_idx
        return p - self.vocab_start if p is not None and self.vocab_start <= p < self.vocab_end else None

    def reset_parameters(self) -> None:
        """N(0, 1) like ``nn.Embedding``; the padding row (if owned) is zero."""
        if self.weight.is_meta:
            return
        nn.init.normal_(self.weight)
        if self._local_padding_idx is not None:
            with torch.no_grad():
                self.weight[self._local_padding_idx].zero_()

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group: Any, *, sequence_parallel: bool = False,
                       grain: int = 1) -> VocabParallelEmbedding:
        """This rank's vocabulary slice of an existing ``nn.Embedding``."""
        g = M.resolve_group(group)
        split = DimSplit.of(embedding.num_embeddings, g.size, grain)
        with torch.device("meta"):
            layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, group=g,
                        sequence_parallel=sequence_parallel, split=split, dtype=embedding.weight.dtype)
        layer._adopt(embedding, ("weight",))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_world == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight, self._local_padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return M.reduce_scatter_to_sequence_parallel_region(out, self.group, self.sequence_dim)
        return M.reduce_from_tensor_model_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (local rows {self.vocab_start}:{self.vocab_end}), "
                f"tp={self.tp_world}, sequence_parallel={self.sequence_parallel}")


PARALLEL_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
