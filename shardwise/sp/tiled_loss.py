"""Tiled (chunked) language-model loss and its reduction over a sequence-parallel group.

**Tiling** (DeepSpeed's ``TiledFusedLogitsLoss``, Arctic Long Sequence Training): the logits of a long sequence are
``tokens x vocab`` floats (1M tokens x 128K vocab in fp32 = 512 GB), far more than the hidden states they come
from. ``TiledFusedLogitsLoss.apply(fn, module, x, y, mask, shards, ...)`` runs ``fn(module, x_chunk, y_chunk)`` (e.g.
lm_head + cross-entropy) on ``shards`` chunks of the flattened ``[batch*seq]`` rows under ``no_grad``, keeping only
each chunk's scalar; backward runs each chunk again with gradients on and accumulates the gradient of ``x`` and of
the weights. So at most one chunk's logits (and their gradient) exist at a time, for one extra lm_head matmul.
The weights are inputs of the autograd node (not updated behind autograd's back), so their gradient arrives once
per backward, like any parameter's: ZeRO's gradient hooks see one ready gradient, not one per chunk.

**Reduction over the group** (``sequence_parallel_mean``): each rank holds the loss *sum* and the valid-token count
of its shard. The loss is the token-weighted mean over the group, the same value on every rank. Its gradient on a
rank is only that rank's share (``d loss / d local_sum = 1 / total_tokens``), so the gradients of the sequence ranks
*sum* to the gradient of the global mean. That matches DeepSpeed 0.19's (and shardwise's) ZeRO 0-2, which sum
gradients over the sequence-parallel ranks; ZeRO-3 averages them there instead (see the engine's
``sequence_parallel_grads_averaged`` and [Note: sequence-parallel gradient reduction] in ``engine/engine.py``):
pass the engine as ``group`` and the share is scaled to match.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.comm.topology import Topology
from shardwise.tp.mappings import resolve_group

IGNORE_INDEX = -100
#: the default ceiling on one chunk's fp32 logits (and again for their gradient)
DEFAULT_CHUNK_BYTES = 256 * 2**20


class _TiledLoss(torch.autograd.Function):
    """Scalar loss of ``fn`` over row chunks; recomputes each chunk in backward. Inputs after ``mask`` are weights."""

    @staticmethod
    def forward(ctx: Any, fn: Callable, module: Any, shards: int, reduction: str, x: torch.Tensor,
                y: torch.Tensor, mask: torch.Tensor | None, *weights: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.module, ctx.reduction, ctx.has_mask = fn, module, reduction, mask is not None
        chunks = _chunks(x, y, mask, shards)
        with torch.no_grad():
            outs = torch.stack([fn(module, *c).reshape(()) for c in chunks])
        ctx.n = len(chunks)
        ctx.shards = shards
        ctx.save_for_backward(x, y, *((mask,) if mask is not None else ()), *weights)
        return outs.sum() if reduction == "sum" else outs.mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        saved = ctx.saved_tensors
        x, y = saved[0], saved[1]
        mask = saved[2] if ctx.has_mask else None
        weights = saved[3:] if ctx.has_mask else saved[2:]
        want_x = ctx.needs_input_grad[4]
        wanted = [w for i, w in enumerate(weights) if ctx.needs_input_grad[7 + i]]
        scale = grad / ctx.n if ctx.reduction == "mean" else grad
        x_grad = torch.zeros_like(x).reshape(-1, *x.shape[2:]) if want_x else None
        acc: list[torch.Tensor | None] = [None] * len(wanted)
        offset = 0
        for xc, *rest in _chunks(x, y, mask, ctx.shards):
            xc = xc.detach().requires_grad_(want_x)
            with torch.enable_grad():
                out = ctx.fn(ctx.module, xc, *rest).reshape(())
            inputs = ([xc] if want_x else []) + wanted
            grads = list(torch.autograd.grad(out, inputs, scale, allow_unused=True)) if inputs else []
            if want_x:
                g = grads.pop(0)
                if g is not None:
                    x_grad[offset: offset + xc.shape[0]] = g
            for i, g in enumerate(grads):  # in place: one weight-sized buffer, plus this chunk's
                if g is not None:
                    acc[i] = g if acc[i] is None else acc[i].add_(g)
            offset += xc.shape[0]
        it = iter(acc)
        weight_grads = [next(it) if ctx.needs_input_grad[7 + i] else None for i in range(len(weights))]
        return (None, None, None, None, x_grad.view_as(x) if want_x else None, None, None, *weight_grads)


def _chunks(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, shards: int) -> list[tuple]:
    """Split the flattened ``[batch*seq]`` rows of x, y (and mask) into ``shards`` chunks."""
    xs = torch.chunk(x.reshape(-1, *x.shape[2:]), shards, dim=0)
    ys = torch.chunk(y.reshape(-1, *y.shape[2:]), shards, dim=0)
    if mask is None:
        return [(a, b) for a, b in zip(xs, ys)]
    ms = torch.chunk(mask.reshape(-1), shards, dim=0)
    return [(a, b, c) for a, b, c in zip(xs, ys, ms)]


def _unique_trainable(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class TiledFusedLogitsLoss:
    """DeepSpeed's ``TiledFusedLogitsLoss``: ``apply(fn, self, x, y, mask, shards, compute_params, output_reduction)``.

    ``fn(self, x_chunk, y_chunk[, mask_chunk]) -> scalar``; ``x`` and ``y`` are ``[batch, seq, ...]`` (rows are
    flattened before chunking); ``mask`` ``[batch, seq]`` or None (then not passed to ``fn``). ``compute_params``:
    the trainable tensors ``fn`` uses (default: ``self.parameters()`` when ``self`` is a module); gradients reach
    only ``x`` and these. ``output_reduction``: "mean" (of the chunk results) or "sum" (use "sum" with per-chunk
    sums when chunks hold different numbers of valid tokens).
    """

    @staticmethod
    def apply(fn: Callable, self: Any, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, shards: int,
              compute_params: Sequence[torch.Tensor] | None = None, output_reduction: str = "mean") -> torch.Tensor:
        if output_reduction not in ("mean", "sum"):
            raise ValueError(f'output_reduction must be "mean" or "sum", got {output_reduction!r}')
        if x.dim() < 2 or y.dim() < 2 or x.shape[:2] != y.shape[:2]:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must both start with [batch, seq]")
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask {tuple(mask.shape)} must be [batch, seq] = {tuple(x.shape[:2])}")
        if int(shards) < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        if compute_params is None:
            compute_params = list(self.parameters()) if isinstance(self, nn.Module) else []
        weights = _unique_trainable(compute_params)
        return _TiledLoss.apply(fn, self, int(shards), output_reduction, x, y, mask, *weights)


def _cross_entropy_sum(head: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(x)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # as transformers' causal-LM loss: the softmax in (at least) fp32
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def num_shards(rows: int, vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Chunks needed so that one chunk's fp32 logits stay under ``chunk_bytes``."""
    return max(1, math.ceil(rows * vocab * 4 / chunk_bytes))


def tiled_cross_entropy_sum(hidden_states: torch.Tensor, lm_head: nn.Module, shift_labels: torch.Tensor,
                            shards: int | None = None,
                            chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of ``lm_head(hidden_states)`` without materialising the logits; also returns
    the number of valid targets (labels != -100). ``shift_labels`` are already shifted (the data adapter's).

    ``shards`` defaults to enough chunks that one chunk's fp32 logits stay under ``chunk_bytes``."""
    if shards is None:
        vocab = getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]
        shards = num_shards(hidden_states.shape[0] * hidden_states.shape[1], int(vocab), chunk_bytes)
    loss_sum = TiledFusedLogitsLoss.apply(_cross_entropy_sum, lm_head, hidden_states, shift_labels, None, shards,
                                          None, "sum")
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


class _Engine(Protocol):
    """What the reduction reads from an engine."""

    topology: Topology
    sequence_parallel_grads_averaged: bool


def _sp_group_and_factor(group: Group | Topology | _Engine | Any) -> tuple[Group, float]:
    """(group, gradient factor): an engine says whether it averages sequence-parallel gradients (then x sp)."""
    if isinstance(group, Topology):
        return group.sp_group, 1.0
    if isinstance(getattr(group, "topology", None), Topology):  # an engine
        g = group.topology.sp_group
        return g, float(g.size) if group.sequence_parallel_grads_averaged else 1.0
    return resolve_group(group), 1.0


def sequence_parallel_mean(loss_sum: torch.Tensor, num_tokens: torch.Tensor | int, group: Any) -> torch.Tensor:
    """Token-weighted mean loss over the sequence-parallel group; the gradient is this rank's share (module doc).

    ``group``: the engine (preferred: it knows how it reduces gradients), a ``Topology``, a ``Group`` or a torch
    ProcessGroup. A shard without valid tokens contributes nothing; a group without any gives 0."""
    g, factor = _sp_group_and_factor(group)
    count = torch.as_tensor(num_tokens, device=loss_sum.device).to(torch.float64)
    totals = torch.stack([loss_sum.detach().to(torch.float64), count])
    if g.size > 1:
        comm.all_reduce(totals, group=g)
    local = loss_sum * factor
    value = (local + (totals[0].to(loss_sum.dtype) - local.detach())) / totals[1].clamp(min=1).to(loss_sum.dtype)
    return value
