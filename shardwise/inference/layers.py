"""Inference forms of the ``shardwise.tp`` layers: the same weights and splits, a forward without autograd that
sends its one collective through ``collectives`` (shared memory between local ranks, see ``collectives.py``).

Each class subclasses the training layer, so construction (on the meta device, from shapes and a ``DimSplit``),
``shard_full`` / ``gather_full``, ``state_dict`` and ``isinstance`` checks are the training layer's own; only
``forward`` differs: without autograd bookkeeping, and with the collective through ``collectives`` once it is set
(``autotp`` sets it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardwise.tp import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def _autograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this call builds a graph (then the training layer's differentiable forward is used)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


class InferenceRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` (input features split, partial products summed over the group) for inference."""

    collectives: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.collectives is None or self.sequence_parallel or not self.input_is_parallel or \
                _autograd(x, self.weight):
            return super().forward(x)
        y = F.linear(x, self.weight)
        self.collectives.all_reduce_(y)
        return y + self.bias if self.bias is not None else y


class InferenceVocabParallelEmbedding(VocabParallelEmbedding):
    """``VocabParallelEmbedding`` (each rank looks up the ids it owns, the rows are summed) for inference."""

    collectives: Any = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.collectives is None or self.tp_world == 1 or self.sequence_parallel or \
                _autograd(ids, self.weight):
            return super().forward(ids)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        out = F.embedding((ids - self.vocab_start).masked_fill(outside, 0), self.weight, self._local_padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        self.collectives.all_reduce_(out)
        return out


class InferenceColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` that keeps its output split: in inference its forward is just the local matmul
    (the training layer's identity-forward autograd function costs more than a small decode matmul)."""

    collectives: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather_output or self.sequence_parallel or _autograd(x, self.weight):
            return super().forward(x)
        return F.linear(x, self.weight, self.bias)


class InferenceGatherLinear(ColumnParallelLinear):
    """A vocabulary-split LM head: ``ColumnParallelLinear`` whose output slices are gathered into full logits."""

    collectives: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.collectives is None or not self.gather_output or self.sequence_parallel or self.split.parts[1:] \
                or _autograd(x, self.weight):
            return super().forward(x)
        y = F.linear(x, self.weight, self.bias)
        return self.collectives.all_gather_last(y, self.split.sizes())


def _foldable(x: torch.Tensor) -> bool:
    """Whether torch's matmul can view ``x`` as one matrix: every leading stride is exactly the next one times its
    size (``is_contiguous`` ignores size-1 dimensions; this check, like matmul's, does not)."""
    sizes, strides = x.shape, x.stride()
    return all(strides[i] == strides[i + 1] * sizes[i + 1] for i in range(x.dim() - 1))


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() > 2 and not _foldable(x):
        return (x.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def keep_head_input_contiguous(model: nn.Module) -> None:
    """Give the LM head an input with standard strides. ``generate`` slices the last position
    (``hidden[:, -1:, :]``, a strided view even at batch 1), and torch's matmul folds such a 3-D input into one
    matrix product only when the weight requires grad; inference weights do not, so it runs a batched product
    against the weight expanded per sequence, which in bf16 on the CPU copies batch x the whole head (1 GB and 5 s
    at batch 16 for a 32K-vocabulary 155M Llama, 190 ms at batch 1, against microseconds for this copy of the
    input)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module):
        head.register_forward_pre_hook(_contiguous_input)
