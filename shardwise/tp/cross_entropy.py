"""Cross-entropy over vocabulary-parallel logits, without ever gathering the full ``[tokens, vocab]`` logits.

Each rank holds the logits of its vocabulary slice (the output of a column-parallel LM head). Three all-reduces
of one value per token replace an all-gather of ``vocab / tp`` values per token:

1. the maximum logit (MAX), subtracted for numerical stability;
2. the target's logit (SUM: only the rank owning the target id contributes a non-zero);
3. the sum of exponentials (SUM).

``loss = log(sum_exp) - target_logit``. The backward needs no communication: the gradient of the local logits is
``softmax_local - onehot_local`` (scaled by the incoming gradient), computed from the softmax saved in forward.
Computed in float32 for 16-bit logits (float64 logits stay float64).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.tp.mappings import resolve_group
from shardwise.tp.partition import DimSplit


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, group: Group, start: int,
                ignore_index: int) -> torch.Tensor:
        x = logits.float() if logits.element_size() < 4 else logits
        end = start + x.shape[-1]
        row_max = x.max(dim=-1).values
        comm.all_reduce(row_max, op=comm.ReduceOp.MAX, group=group)
        x = x - row_max.unsqueeze(-1)
        outside = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(outside, 0)
        picked = x.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        comm.all_reduce(picked, group=group)
        exp = x.exp_()
        sum_exp = exp.sum(dim=-1)
        comm.all_reduce(sum_exp, group=group)
        ignored = target == ignore_index
        loss = (sum_exp.log() - picked).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple:
        softmax, local_target, outside, ignored = ctx.saved_tensors
        grad = softmax.clone()
        onehot = (~outside).to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot)
        scale = grad_loss.to(grad.dtype).masked_fill(ignored, 0.0).unsqueeze(-1)
        grad.mul_(scale)
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: Any = None, *,
                                 split: DimSplit | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy (float32 or wider, shape of ``target``) of logits split along the vocabulary.

    ``logits``: ``[..., local_vocab]`` on each rank of ``group``; ``target``: ``[...]`` global token ids.
    ``split`` says which vocabulary slice each rank owns (default: even slices in rank order, as a
    ``ColumnParallelLinear`` LM head produces). Tokens equal to ``ignore_index`` get loss 0 and no gradient;
    average with ``loss.sum() / (target != ignore_index).sum()``. With no group (or one rank) this is exactly
    ``F.cross_entropy(..., reduction="none")``.
    """
    g = resolve_group(group)
    if g.size == 1:
        x = logits.float() if logits.element_size() < 4 else logits
        flat = F.cross_entropy(x.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               ignore_index=ignore_index, reduction="none")
        return flat.view(target.shape)
    rank = g.rank
    if split is None:
        start = rank * logits.shape[-1]
    else:
        if split.local_size(rank) != logits.shape[-1]:
            raise ValueError(f"the split gives rank {rank} {split.local_size(rank)} vocabulary entries but its logits "
                             f"have {logits.shape[-1]}; pass the LM head's split (layer.split)")
        start = split.start(rank)
    return _VocabParallelCrossEntropy.apply(logits, target, g, start, ignore_index)
