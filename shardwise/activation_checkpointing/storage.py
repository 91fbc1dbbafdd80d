"""Where a checkpoint keeps its inputs until recomputation: as they are, partitioned over the tensor group, on
the host, and/or in preallocated contiguous buffers.

A ``Stash`` is made in the checkpoint's forward from the function's arguments and turned back into them in the
backward. Only floating-point tensors ("activations") are transformed; integers (token ids, masks), non-tensors,
and tensors marked ``no_checkpointing = True`` are kept as they are.

[Note: partitioned activations] Inside a tensor-parallel model the input of a transformer block is replicated on
every tensor rank. With ``partition_activations`` each rank keeps only a 1/tp slice (flattened, zero-padded to a
multiple of tp) and the recomputation all-gathers it back over the tensor group: saved-input memory falls by tp
at the cost of one all-gather per checkpoint in the backward. The slice is a copy, so the full input can be freed
as soon as the forward moves on.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from shardwise.activation_checkpointing import buffers
from shardwise.activation_checkpointing.settings import Settings
from shardwise.comm.collectives import all_gather_padded
from shardwise.comm.group import Group
from shardwise.comm.shards import padded_shard


def is_activation(x: Any) -> bool:
    """Whether ``x`` is an input that partitioning/offloading applies to."""
    return torch.is_tensor(x) and x.is_floating_point() and not getattr(x, "no_checkpointing", False)


_LIVE: weakref.WeakSet = weakref.WeakSet()


@dataclass
class _Entry:
    kind: str  # "object": kept as is | "tensor": a (possibly moved) tensor | "slice": this rank's partition
    value: Any
    shape: tuple[int, ...] = ()
    device: torch.device | None = None


def _to_host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.detach().to("cpu")


class Stash:
    """The saved inputs of one checkpoint (see the module docstring)."""

    def __init__(self, args: tuple, settings: Settings, group: Group | None) -> None:
        self.group = group if group is not None and group.size > 1 else None
        partition = settings.partition_activations and self.group is not None
        self.entries: list[_Entry] = []
        slot = 0
        for arg in args:
            if not is_activation(arg):
                self.entries.append(_Entry("object", arg))
                continue
            if partition:
                piece = self._slice(arg)
                if settings.cpu_checkpointing:
                    piece = _to_host(piece)
                if settings.contiguous_memory_optimization:  # the block lives where the slices do
                    piece = buffers.take(slot, piece, settings.number_checkpoints or 1)
                self.entries.append(_Entry("slice", piece, tuple(arg.shape), arg.device))
            elif settings.cpu_checkpointing:
                self.entries.append(_Entry("tensor", _to_host(arg), tuple(arg.shape), arg.device))
            else:
                self.entries.append(_Entry("tensor", arg.detach(), tuple(arg.shape), arg.device))
            slot += 1
        _LIVE.add(self)

    def _slice(self, x: torch.Tensor) -> torch.Tensor:
        return padded_shard(x.detach().reshape(-1), self.group.size, self.group.rank).clone()

    def restore(self) -> list[Any]:
        """The original arguments (tensors detached, on their original devices). Collective when partitioned."""
        out = []
        for e in self.entries:
            if e.kind == "object":
                out.append(e.value)
            elif e.kind == "tensor":
                out.append(e.value.to(e.device) if e.value.device != e.device else e.value)
            else:
                numel = 1
                for s in e.shape:
                    numel *= s
                out.append(all_gather_padded(e.value.to(e.device), numel, self.group).view(e.shape))
        return out

    def release(self) -> None:
        """Drop the saved tensors (after the recomputation)."""
        self.entries = []

    def nbytes_by_device(self) -> dict[str, int]:
        """Bytes of the copies and slices this stash made, per device type (what ``memory_stats`` sums).

        Activations kept as they are (no partitioning or offloading) count too: the stash keeps them alive.
        Non-activation inputs (token ids, masks, constants marked ``no_checkpointing``) are not counted.
        """
        out: dict[str, int] = defaultdict(int)
        for e in self.entries:
            if e.kind != "object":
                t = e.value
                out[t.device.type] += t.numel() * t.element_size()
        return dict(out)


def memory_stats() -> dict[str, int]:
    """Bytes of checkpoint inputs currently held, per device type, over every live checkpoint of this process."""
    total: dict[str, int] = defaultdict(int)
    for stash in list(_LIVE):
        for device, n in stash.nbytes_by_device().items():
            total[device] += n
    return dict(total)
