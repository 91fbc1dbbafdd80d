"""The attention masks of the whole sequence, rebuilt after the Ulysses all-to-all (pure torch, no collectives).

A Hugging Face model under Ulysses builds its attention mask for the *local* shard (``[b, 1, s/P, s/P]`` or nothing),
but after the all-to-all each rank attends over the *whole* sequence for a subset of heads, so that mask is useless.
This module rebuilds the mask transformers itself would have built for the full sequence, from three small
``[batch, seq]`` facts gathered once per forward (``FullSequence``):

* causal: key ``j`` visible to query ``i`` iff ``j <= i``;
* padding: keys where the 2D ``attention_mask`` is 0 are hidden (transformers' ``padding_mask_function``);
* packed documents: without a padding mask, ``position_ids`` that do not increase by exactly 1 start a new document,
  and tokens only see their own document (transformers' ``find_packed_sequence_indices``);
* sliding window: key ``j`` visible to ``i`` iff ``i - j < window`` (``sliding_window_overlay``), per layer.

The rules and their precedence follow ``transformers.masking_utils`` (5.x), so the sequence-parallel model computes
exactly what the single-process model computes, including on padded rows (fully masked rows stay fully masked, as
there). For ``sdpa`` a plain causal pattern returns ``None`` (the kernel's ``is_causal`` path: no ``S x S`` mask is
ever materialised); ``eager`` always needs the additive float mask (``0`` / dtype minimum), an ``S x S`` tensor, which
is why ``sdpa`` is the backend for long sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class FullSequence:
    """What attention over the whole (unsharded) sequence needs to know about the current batch."""

    position_ids: torch.Tensor | None
    """``[batch or 1, S]`` global positions (all shards concatenated), or None when unknown."""
    padding: torch.Tensor | None
    """``[batch, S]`` bool, True = a real token; None when nothing is padded (or no mask was given)."""
    mask_given: bool = False
    """Whether the batch came with a 2D attention mask (transformers then never looks for packed documents)."""
    local_position_ids: torch.Tensor | None = None
    """The very tensor this rank's model received as ``position_ids`` (identifies the forward it belongs to)."""

    @property
    def documents(self) -> torch.Tensor | None:
        """``[batch, S]`` document index of every token when several documents are packed in a row, else None.

        As transformers: only without a padding mask, from position ids that do not step by exactly 1."""
        if self.mask_given or self.position_ids is None:
            return None
        return document_ids(self.position_ids)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Index of the packed document each token belongs to, or None when every row holds a single document."""
    start = position_ids[:, :1] - 1
    steps = torch.diff(position_ids, prepend=start, dim=-1)
    docs = (steps != 1).cumsum(-1)
    if bool((docs[:, -1] == 0).all()):
        return None
    return docs


def visible(seq: FullSequence, length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[batch or 1, 1, S, S]`` bool: True where query ``i`` may attend to key ``j``."""
    idx = torch.arange(length, device=device)
    allowed = idx[None, :] <= idx[:, None]  # [S, S] causal
    if window is not None:
        allowed = allowed & (idx[:, None] - idx[None, :] < window)
    allowed = allowed[None, None]
    docs = seq.documents
    if docs is not None:
        docs = docs.to(device)
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    if seq.padding is not None:
        allowed = allowed & seq.padding.to(device)[:, None, None, :]
    return allowed


def needs_mask(seq: FullSequence, length: int, window: int | None) -> bool:
    """Whether the pattern is anything but plain causal (sdpa can then not use ``is_causal``)."""
    return seq.padding is not None or seq.documents is not None or (window is not None and length >= window)


def sdpa_mask(seq: FullSequence, length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """The boolean mask transformers gives ``sdpa`` for the full sequence, or None for plain causal attention."""
    if not needs_mask(seq, length, window):
        return None
    return visible(seq, length, window, device)


def eager_mask(seq: FullSequence, length: int, window: int | None, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """The additive float mask transformers gives ``eager``: 0 where visible, the dtype's minimum elsewhere."""
    allowed = visible(seq, length, window, device)
    zero = torch.zeros((), device=device, dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)
