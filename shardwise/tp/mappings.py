"""Autograd mappings between tensor-parallel regions: each is one collective forward and its adjoint backward.

The four of Megatron's paper (f and g are conjugate: one is the identity where the other all-reduces):

=========================================  ===========================  ==============================
function                                   forward                      backward
=========================================  ===========================  ==============================
``copy_to_tensor_model_parallel_region``   identity                     all-reduce
``reduce_from_tensor_model_parallel_region`` all-reduce                 identity
``scatter_to_tensor_model_parallel_region``  keep my slice of ``dim``   all-gather ``dim``
``gather_from_tensor_model_parallel_region`` all-gather ``dim``         keep my slice of ``dim``
=========================================  ===========================  ==============================

and the three of sequence parallelism (activations split along the sequence between tensor-parallel ranks):
``scatter_to_sequence_parallel_region`` (split / all-gather), ``gather_from_sequence_parallel_region``
(all-gather / reduce-scatter) and ``reduce_scatter_to_sequence_parallel_region`` (reduce-scatter / all-gather).

``group`` is a ``shardwise.comm.Group`` (e.g. ``topology.tp_group``) or a torch ProcessGroup; ``None`` means no
tensor parallelism. Over a group of one rank every function returns its input untouched and adds no autograd node
(the single-rank fast path), so a degree-1 model runs exactly the plain PyTorch computation.
Slices may be uneven (``sizes``: every rank's extent along ``dim``), for weights whose dimension does not divide
by the degree; sequence splits must be even.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from shardwise import comm
from shardwise.comm.group import Group, as_group


def solo_group() -> Group:
    """A group holding only this rank (every collective over it is skipped)."""
    me = dist.get_rank() if dist.is_initialized() else 0
    return Group("solo", (me,))


def resolve_group(group: Any) -> Group:
    """``None`` -> a one-rank group (no parallelism); a ``Topology`` -> its tensor group; else ``as_group``."""
    if group is None:
        return solo_group()
    if hasattr(group, "tp_group") and not isinstance(group, Group):
        return group.tp_group
    return as_group(group)


def _dim(x: torch.Tensor, dim: int) -> int:
    return dim % x.dim()


def _even(sizes: Sequence[int] | None) -> bool:
    return sizes is None or len(set(sizes)) == 1


# -- collectives along a dimension (no autograd) ------------------------------------------------------------------
def all_gather_dim(x: torch.Tensor, group: Group, dim: int, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order); ``sizes`` = each rank's extent if uneven."""
    dim, n = _dim(x, dim), group.size
    if not _even(sizes):
        width = max(sizes)
        padded = x.new_zeros(x.shape[:dim] + (width,) + x.shape[dim + 1:])
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        full = all_gather_dim(padded, group, dim)
        return torch.cat([c.narrow(dim, 0, s) for c, s in zip(full.split(width, dim), sizes)], dim=dim)
    x = x.contiguous()
    out = x.new_empty((n,) + tuple(x.shape))
    comm.all_gather_into_tensor(out.view(-1), x.view(-1), group=group)
    if dim == 0:
        return out.view((n * x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat(out.unbind(0), dim=dim)


def reduce_scatter_dim(x: torch.Tensor, group: Group, dim: int, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's slice of ``dim`` (``sizes``: every rank's slice if uneven)."""
    dim, n, rank = _dim(x, dim), group.size, group.rank
    sizes = list(sizes) if sizes is not None else [x.shape[dim] // n] * n
    if sum(sizes) != x.shape[dim]:
        raise ValueError(f"reduce-scatter along dim {dim}: slices {sizes} do not add up to the tensor's {x.shape[dim]} "
                         f"(for an even split the size must be divisible by the group size {n})")
    width = max(sizes)
    if _even(sizes) and dim == 0:
        stacked = x.contiguous()
    else:
        chunks = []
        for c in x.split(sizes, dim):
            if c.shape[dim] < width:
                pad = c.new_zeros(c.shape[:dim] + (width - c.shape[dim],) + c.shape[dim + 1:])
                c = torch.cat([c, pad], dim=dim)
            chunks.append(c.movedim(dim, 0))
        stacked = torch.stack(chunks).contiguous()  # [n, width, ...rest]
    out_shape = (width,) + tuple(s for i, s in enumerate(x.shape) if i != dim)
    out = x.new_empty(out_shape)
    comm.reduce_scatter_tensor(out.view(-1), stacked.view(-1), group=group)
    out = out.narrow(0, 0, sizes[rank])
    return out.movedim(0, dim).contiguous() if dim != 0 else out


def split_dim(x: torch.Tensor, group: Group, dim: int, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """This rank's slice of ``x`` along ``dim`` (a contiguous copy)."""
    dim, n = _dim(x, dim), group.size
    if sizes is None:
        if x.shape[dim] % n:
            raise ValueError(f"cannot split dimension {dim} of size {x.shape[dim]} evenly over {n} ranks; make it "
                             f"divisible by {n} (e.g. pad the sequence) or pass explicit sizes")
        sizes = [x.shape[dim] // n] * n
    return x.split(list(sizes), dim)[group.rank].contiguous()


# -- autograd functions -------------------------------------------------------------------------------------------
class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        grad = grad.clone(memory_format=torch.contiguous_format)  # the incoming grad may be shared with a residual
        comm.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        comm.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, dim: int, sizes: Any) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return split_dim(x, group, dim, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return all_gather_dim(grad, ctx.group, ctx.dim, ctx.sizes), None, None, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, dim: int, sizes: Any) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return all_gather_dim(x, group, dim, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return split_dim(grad, ctx.group, ctx.dim, ctx.sizes), None, None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, dim: int, tp_output_grad: bool) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.tp_output_grad = group, dim, tp_output_grad
        return all_gather_dim(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.tp_output_grad:  # each rank holds a partial sum of the gradient (it feeds a column-parallel layer)
            return reduce_scatter_dim(grad, ctx.group, ctx.dim), None, None, None
        return split_dim(grad, ctx.group, ctx.dim), None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return reduce_scatter_dim(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return all_gather_dim(grad, ctx.group, ctx.dim), None, None


# -- public functions ---------------------------------------------------------------------------------------------
def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel layer)."""
    g = resolve_group(group)
    return x if g.size == 1 else _CopyToRegion.apply(x, g)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel layer)."""
    g = resolve_group(group)
    return x if g.size == 1 else _ReduceFromRegion.apply(x, g)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: Any, dim: int = -1,
                                            sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Keep this rank's slice of ``dim`` forward; all-gather the gradient backward."""
    g = resolve_group(group)
    return x if g.size == 1 else _ScatterToRegion.apply(x, g, dim, _tuple(sizes))


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: Any, dim: int = -1,
                                             sizes: Sequence[int] | None = None) -> torch.Tensor:
    """All-gather along ``dim`` forward (rank order); keep this rank's slice of the gradient backward."""
    g = resolve_group(group)
    return x if g.size == 1 else _GatherFromRegion.apply(x, g, dim, _tuple(sizes))


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any, dim: int = 1) -> torch.Tensor:
    """Split the sequence dimension forward (enter the sequence-parallel region); all-gather backward."""
    g = resolve_group(group)
    return x if g.size == 1 else _ScatterToRegion.apply(x, g, dim, None)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Any, dim: int = 1,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather the sequence forward; backward reduce-scatters (the consumer is tensor-parallel) or splits."""
    g = resolve_group(group)
    return x if g.size == 1 else _GatherFromSequence.apply(x, g, dim, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any, dim: int = 1) -> torch.Tensor:
    """Sum partial outputs and keep this rank's sequence slice forward; all-gather the gradient backward."""
    g = resolve_group(group)
    return x if g.size == 1 else _ReduceScatterToSequence.apply(x, g, dim)


def _tuple(sizes: Sequence[int] | None) -> tuple[int, ...] | None:
    return tuple(int(s) for s in sizes) if sizes is not None else None


__all__ = [
    "all_gather_dim", "copy_to_tensor_model_parallel_region", "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_dim", "reduce_scatter_to_sequence_parallel_region", "resolve_group",
    "scatter_to_sequence_parallel_region", "scatter_to_tensor_model_parallel_region", "solo_group", "split_dim",
]
