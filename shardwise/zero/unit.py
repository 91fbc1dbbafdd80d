"""``ParamUnit``: the parameters one module owns directly (one optimizer group, or its frozen ones), flattened and
partitioned for ZeRO-3, with the state machine SHARDED -> GATHERING -> GATHERED -> SHARDED.

The unit's parameters are laid out back to back in a flat buffer padded to a multiple of the group size; rank
``shard_index`` owns one contiguous chunk of it (its *shard*, a view into the strategy's per-group buffer, so the
optimizer steps one tensor per group). Gathering allocates the flat buffer, all-gathers every shard into it and
points each parameter's ``.data`` at its slice: no per-parameter collectives and no copy-out. Releasing points
``.data`` back at an empty tensor and frees the buffer. During backward every parameter's ``.grad`` is a view of a
flat gradient buffer, so one reduce-scatter moves the unit's gradients straight into the owners' shards.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch import nn

from shardwise.zero.layout import FlatLayout


class UnitState(enum.Enum):
    """Where a unit's full parameters are."""

    SHARDED = "sharded"  # only this rank's shard exists; parameters point at empty tensors
    GATHERING = "gathering"  # an all-gather into the full buffer is in flight (prefetch)
    GATHERED = "gathered"  # parameters are views of the full buffer


class ParamUnit:
    """One gather/reduce unit of ZeRO-3."""

    def __init__(self, uid: int, name: str, params: list[nn.Parameter], layout: FlatLayout, trainable: bool,
                 shard_comm: Any, persistent: bool, group_index: int | None) -> None:
        self.uid = uid
        self.name = name
        self.params = params
        self.layout = layout
        self.trainable = trainable
        self.comm = shard_comm
        self.persistent = persistent
        self.group_index = group_index  # optimizer group (None for frozen units)
        self.shapes = [getattr(p, "_sw_init_shape", p.shape) for p in params]
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.store: Any = None  # set by the strategy: the group's shard store (param_offload.py)
        self.shard_offset = 0  # where the shard sits in the group's buffers
        self.full: torch.Tensor | None = None
        self.grad_full: torch.Tensor | None = None
        self.state = UnitState.SHARDED
        self.cache: dict[str, Any] = {}  # hpZ secondary partition
        self._handle: Any = None
        self._source: torch.Tensor | None = None  # the shard being sent by an in-flight gather
        self._empty = [torch.empty(0, dtype=p.dtype, device=p.device) for p in params]
        self.pending_grads = 0

    # -- sizes ----------------------------------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Parameter elements (padding excluded)."""
        return self.layout.used_numel

    @property
    def shard_numel(self) -> int:
        """Elements in each rank's shard."""
        return self.layout.total // self.comm.world

    @property
    def shard(self) -> torch.Tensor | None:
        """This rank's shard in memory (None when it lives in a file)."""
        return self.store.view(self.shard_offset, self.shard_numel)

    def prefetch_shard(self) -> None:
        """Start reading the shard from its store ahead of the gather (NVMe offload)."""
        if self.state is UnitState.SHARDED:
            self.store.prefetch(self.shard_offset, self.shard_numel)

    @property
    def shard_range(self) -> tuple[int, int]:
        """This rank's chunk of the flat unit."""
        lo = self.comm.shard_index * self.shard_numel
        return lo, lo + self.shard_numel

    # -- gather / release -----------------------------------------------------------------------------------------
    def gather(self, async_op: bool = True) -> None:
        """Start (or, with ``async_op=False``, complete) the all-gather of the full parameters."""
        if self.state is UnitState.SHARDED:
            self.full = torch.empty(self.layout.total, dtype=self.dtype, device=self.device)
            self._source = self.store.fetch(self.shard_offset, self.shard_numel)
            self._handle = self.comm.gather(self.full, self._source, self.cache, async_op=True)
            self.state = UnitState.GATHERING
        if not async_op:
            self.wait()

    def wait(self) -> None:
        """Finish an in-flight gather and point every parameter at its full values."""
        if self.state is not UnitState.GATHERING:
            return
        self._handle.wait()
        self._handle = self._source = None
        for slot, p in zip(self.layout.slots, self.params):
            p.data = self.full[slot.offset : slot.offset + slot.numel].view(self.shapes[slot.index])
        self.state = UnitState.GATHERED

    def release(self, force: bool = False) -> None:
        """Drop the full parameters (persistent units keep them unless ``force``)."""
        if self.state is UnitState.SHARDED or (self.persistent and not force):
            return
        self.wait()
        for p, empty in zip(self.params, self._empty):
            p.data = empty
        self.full = None
        self.state = UnitState.SHARDED

    def refresh(self) -> Any:
        """Re-gather a resident (persistent) unit after its shards changed; returns the collective's handle."""
        self._source = self.store.fetch(self.shard_offset, self.shard_numel)
        return self.comm.gather(self.full, self._source, self.cache, async_op=True)

    def materialize_full(self, values: torch.Tensor) -> None:
        """Become GATHERED from known full values (build time, persistent units); keeps this rank's shard in sync."""
        self.full = values
        lo, hi = self.shard_range
        self.store.write(self.shard_offset, values[lo:hi])
        self.state = UnitState.GATHERING
        self._handle = _Done()
        self.wait()

    # -- gradients --------------------------------------------------------------------------------------------------
    def attach_grads(self, dtype: torch.dtype) -> None:
        """Give every trainable parameter a ``.grad`` view of one zeroed flat buffer (once per backward)."""
        if not self.trainable or self.grad_full is not None:
            return
        self.grad_full = torch.zeros(self.layout.total, dtype=dtype, device=self.device)
        if dtype != self.dtype:
            return  # autograd produces grads in the parameter dtype: they are copied in by ``absorb_grad``
        for slot, p in zip(self.layout.slots, self.params):
            p.grad = self.grad_full[slot.offset : slot.offset + slot.numel].view(self.shapes[slot.index])

    def absorb_grad(self, index: int) -> None:
        """Fold a parameter's gradient into the flat buffer if autograd did not write there directly."""
        p = self.params[index]
        slot = self.layout.slots[index]
        view = self.grad_full[slot.offset : slot.offset + slot.numel]
        if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
            view.add_(p.grad.reshape(-1))
        p.grad = None

    def take_grads(self) -> torch.Tensor:
        """Detach the flat gradient buffer from the parameters and hand it over for reduction."""
        grads = self.grad_full
        if grads is None:
            grads = torch.zeros(self.layout.total, dtype=self.dtype, device=self.device)
        for p in self.params:
            p.grad = None
        self.grad_full = None
        return grads

    def __repr__(self) -> str:
        return (f"ParamUnit({self.name}, {len(self.params)} params, {self.numel:,} elems, {self.state.value}"
                f"{', persistent' if self.persistent else ''}{', frozen' if not self.trainable else ''})")


class _Done:
    def wait(self) -> None:
        return None
