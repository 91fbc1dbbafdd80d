"""All-to-all sequence parallelism (the DeepSpeed-Ulysses scheme): ``DistributedAttention`` around any attention.

Every rank of the sequence-parallel group holds a contiguous shard of the sequence for all heads. Attention needs
the whole sequence, but each head is independent, so one all-to-all turns ``[batch, seq/P, heads, dim]`` into
``[batch, seq, heads/P, dim]`` (scatter heads, gather sequence), the local attention runs on full sequences of its
heads, and a second all-to-all turns the context back. Per layer that is 4 all-to-alls forward (q, k, v, out) and
4 backward, each moving ``1/P`` of an activation per peer: the communication volume per rank falls as the group
grows, unlike an all-gather of the sequence.

Heads need not divide evenly (the first ranks take one more). With grouped-query attention, the key/value heads
must divide by the group size (or be repeated up to the query heads before the call) so that every rank's query
heads find their key/value heads locally.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod
from typing import Any

import torch
from torch import nn

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.tp.mappings import resolve_group
from shardwise.tp.partition import partition_sizes


def all_to_all_dims(x: torch.Tensor, group: Group, scatter_dim: int, gather_dim: int,
                    scatter_sizes: Sequence[int], gather_sizes: Sequence[int]) -> torch.Tensor:
    """Send chunk j of ``scatter_dim`` (sizes ``scatter_sizes``) to rank j; concatenate what every rank i sends
    (``gather_sizes[i]`` along ``gather_dim``) along ``gather_dim``, in rank order. No autograd."""
    sd, gd = scatter_dim % x.dim(), gather_dim % x.dim()
    me = group.rank
    if sum(scatter_sizes) != x.shape[sd] or gather_sizes[me] != x.shape[gd]:
        raise ValueError(f"all-to-all: dim {sd} of size {x.shape[sd]} cannot be split as {list(scatter_sizes)}, or "
                         f"dim {gd} ({x.shape[gd]}) is not this rank's {gather_sizes[me]}")
    moved = x.movedim(sd, 0).contiguous()  # [scatter, *rest]
    rest = list(moved.shape[1:])
    g_pos = gd - 1 if gd > sd else gd  # position of the gather dim inside `rest`
    rest_numel = prod(rest)
    in_splits = [s * rest_numel for s in scatter_sizes]
    shapes = []
    for size in gather_sizes:
        shape = list(rest)
        shape[g_pos] = size
        shapes.append([scatter_sizes[me], *shape])
    out_splits = [prod(s) for s in shapes]
    out = moved.new_empty(sum(out_splits))
    comm.all_to_all_single(out, moved.view(-1), out_splits, in_splits, group=group)
    pieces = [p.view(s).movedim(0, sd) for p, s in zip(out.split(out_splits), shapes)]
    return torch.cat(pieces, dim=gd)


class _SeqAllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_dims``: the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group, scatter_dim: int, gather_dim: int,
                scatter_sizes: tuple, gather_sizes: tuple) -> torch.Tensor:
        ctx.args = (group, gather_dim, scatter_dim, gather_sizes, scatter_sizes)
        return all_to_all_dims(x, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        group, sd, gd, ss, gs = ctx.args
        return all_to_all_dims(grad, group, sd, gd, ss, gs), None, None, None, None, None


def seq_all_to_all(x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int,
                   scatter_sizes: Sequence[int] | None = None,
                   gather_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Differentiable all-to-all; sizes default to even splits of ``scatter_dim`` and equal ``gather_dim`` shards."""
    g = resolve_group(group)
    if g.size == 1:
        return x
    n = g.size
    ss = tuple(scatter_sizes) if scatter_sizes is not None else tuple(partition_sizes(x.shape[scatter_dim], n))
    gs = tuple(gather_sizes) if gather_sizes is not None else (x.shape[gather_dim],) * n
    return _SeqAllToAll.apply(x, g, scatter_dim, gather_dim, ss, gs)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class DistributedAttention(nn.Module):
    """Sequence-parallel wrapper of ``local_attention(q, k, v, *args, **kwargs) -> context`` (DeepSpeed's class).

    ``query``/``key``/``value`` are this rank's sequence shard, ``[batch, seq/P, heads, head_dim]``
    (``batch_dim_idx=0``) or ``[seq/P, batch, heads, head_dim]`` (``batch_dim_idx=1``); heads are at
    ``scatter_idx``. The local attention sees the full sequence for ``heads/P`` heads in the same layout and may
    return its context with heads and head_dim merged. The result has the input's layout and sequence shard.
    ``rotary_pos_emb``: ``(cos, sin)`` broadcastable to the full-sequence q/k (applied after the exchange) or a
    callable ``(q, k) -> (q, k)``. ``sp_stream`` (communication overlap on GPUs) is accepted and not used.
    """

    def __init__(self, local_attention: Callable[..., torch.Tensor], sequence_process_group: Any,
                 scatter_idx: int = 2, gather_idx: int = 0, sp_stream: Any = None) -> None:
        super().__init__()
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx = scatter_idx
        self.gather_idx = gather_idx
        self.sp_stream = sp_stream

    def _parse(self, args: tuple, kwargs: dict) -> tuple[int, Any, tuple, dict]:
        """DeepSpeed 0.15+ passes ``batch_dim_idx`` (and ``rotary_pos_emb``) positionally; older code does not."""
        kwargs = dict(kwargs)
        batch = kwargs.pop("batch_dim_idx", None)
        rotary = kwargs.pop("rotary_pos_emb", None)
        args = tuple(args)
        if batch is None and args and isinstance(args[0], int) and not isinstance(args[0], bool):
            batch, args = args[0], args[1:]
            if args and rotary is None and (args[0] is None or isinstance(args[0], tuple) or callable(args[0])):
                rotary, args = args[0], args[1:]
        if batch is None:
            batch = 1 if self.gather_idx == 0 else 0  # gather_idx is the sequence dimension
        if batch not in (0, 1):
            raise ValueError(f"batch_dim_idx must be 0 ([batch, seq, heads, dim]) or 1 ([seq, batch, ...]), "
                             f"got {batch}")
        return batch, rotary, args, kwargs

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        batch_dim, rotary, args, kwargs = self._parse(args, kwargs)
        group = resolve_group(self.spg)
        seq_dim, head_dim = 1 - batch_dim, self.scatter_idx
        n = group.size
        heads = [t.shape[head_dim] for t in (query, key, value)]
        if n > 1 and heads[1] != heads[0] and heads[1] % n:
            raise ValueError(f"{heads[1]} key/value heads cannot be split over {n} sequence-parallel ranks so that "
                             "each rank's query heads find theirs; repeat the key/value heads up to the query heads "
                             "before calling DistributedAttention, or use a group size that divides them")
        q_sizes = partition_sizes(heads[0], n)
        q, k, v = (seq_all_to_all(t, group, head_dim, seq_dim, partition_sizes(h, n))
                   for t, h in zip((query, key, value), heads))
        if rotary is not None:
            q, k = rotary(q, k) if callable(rotary) else self._rope(q, k, *rotary)
        context = self.local_attn(q, k, v, *args, **kwargs)
        if n == 1:
            return context
        if context.dim() == query.dim() - 1:  # heads merged with head_dim: gather in units of head_dim
            d = query.shape[-1]
            return seq_all_to_all(context, group, seq_dim, head_dim, None, [s * d for s in q_sizes])
        return seq_all_to_all(context, group, seq_dim, head_dim, None, q_sizes)

    @staticmethod
    def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
