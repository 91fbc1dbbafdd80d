"""Datasets and a tiny layered language model for the data-efficiency tests (curriculum, random-LTD, corpus runs).

``TinyLM`` is Megatron-shaped where it matters: blocks in ``layers.<i>`` (random-LTD layer numbers), an optional
``attention_mask`` keyword to every block, hidden states batch- or sequence-first, and the legacy
``curriculum_seqlen`` keyword truncating the input as Megatron-DeepSpeed's GPT does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

VOCAB, SEQ = 32, 16


class TokenPairs(Dataset):
    """Sample i: ``(tokens[SEQ], next tokens[SEQ])`` from a fixed generator (the same in every process)."""

    def __init__(self, n: int = 64, seq: int = SEQ, vocab: int = VOCAB, seed: int = 99) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, :-1], self.data[i, 1:]


class TinyBlock(nn.Module):
    """Masked mean over earlier positions, then a residual tanh-linear; hidden states batch- or sequence-first."""

    def __init__(self, width: int, seq_first: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.seq_first = seq_first

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = h.transpose(0, 1) if self.seq_first else h  # [batch, seq, width]
        s = x.size(1)
        mask = attention_mask[:, 0] if attention_mask is not None else \
            torch.tril(torch.ones(s, s, dtype=x.dtype, device=x.device)).expand(x.size(0), s, s)
        mixed = torch.bmm(mask.to(x.dtype), x) / mask.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
        out = x + torch.tanh(self.lin(mixed))
        return out.transpose(0, 1) if self.seq_first else out


class TinyLM(nn.Module):
    """Embedding, ``layers`` TinyBlocks, head; ``forward(tokens, labels)`` returns the mean cross-entropy."""

    def __init__(self, layers: int = 4, width: int = 8, vocab: int = VOCAB, seq_first: bool = False,
                 pass_mask: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(TinyBlock(width, seq_first) for _ in range(layers))
        self.head = nn.Linear(width, vocab)
        self.seq_first = seq_first
        self.pass_mask = pass_mask
        self.seen_lengths: list[int] = []

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, curriculum_seqlen: int | None = None
                ) -> torch.Tensor:
        if curriculum_seqlen is not None and curriculum_seqlen < tokens.size(1):
            tokens, labels = tokens[:, :curriculum_seqlen], labels[:, :curriculum_seqlen]
        self.seen_lengths.append(tokens.size(1))
        h = self.embed(tokens)
        b, s = tokens.shape
        kwargs = {}
        if self.pass_mask:
            kwargs["attention_mask"] = torch.tril(torch.ones(s, s, dtype=h.dtype)).expand(b, 1, s, s)
        if self.seq_first:
            h = h.transpose(0, 1)
        for layer in self.layers:
            h = layer(h, **kwargs)
        if self.seq_first:
            h = h.transpose(0, 1)
        logits = self.head(h)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))
