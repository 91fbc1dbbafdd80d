"""The preallocated contiguous blocks that ``contiguous_memory_optimization`` copies saved slices into.

Owned here (not by ``storage``) so that ``settings.configure()`` can drop them without importing the storage layer.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class CheckpointingConfigError(ValueError):
    """The activation-checkpointing options cannot be combined; the message says how to fix them."""


class _ContiguousBuffers:
    """One preallocated ``[number_checkpoints, slice]`` block per argument position, filled row by row."""

    def __init__(self) -> None:
        self.blocks: dict[int, torch.Tensor] = {}
        self.next: dict[int, int] = defaultdict(int)

    def take(self, index: int, piece: torch.Tensor, slots: int) -> torch.Tensor:
        block = self.blocks.get(index)
        if block is None:
            block = torch.empty((slots, piece.numel()), dtype=piece.dtype, device=piece.device)
            self.blocks[index] = block
        if block.shape[1] != piece.numel() or block.dtype != piece.dtype or block.device != piece.device:
            raise CheckpointingConfigError(
                f"contiguous_memory_optimization needs every checkpoint's argument {index} to have the same size, "
                f"dtype and device; got a slice of {piece.numel()} {piece.dtype} on {piece.device} after "
                f"{block.shape[1]} {block.dtype} on {block.device}. Turn contiguous_memory_optimization off")
        row = self.next[index]
        if row >= slots:
            raise CheckpointingConfigError(
                f"more than number_checkpoints={slots} checkpoints were stored in one forward pass; raise "
                "activation_checkpointing.number_checkpoints (or configure(num_checkpoints=...)) to the number of "
                "checkpointed calls per forward, or call shardwise.checkpointing.reset() between forward passes "
                "that have no backward (evaluation)")
        self.next[index] = row + 1
        return block[row].copy_(piece)


_BUFFERS = _ContiguousBuffers()


def take(index: int, piece: torch.Tensor, slots: int) -> torch.Tensor:
    """Copy ``piece`` into the next free row of argument ``index``'s block (made for ``slots`` checkpoints)."""
    return _BUFFERS.take(index, piece, slots)


def release_contiguous_buffers() -> None:
    """Forget the contiguous blocks (slices already handed out stay valid until their checkpoints finish)."""
    global _BUFFERS
    _BUFFERS = _ContiguousBuffers()
