"""``GradReducer``: moves gradients out of autograd into buckets and launches each bucket's reduction.

Called from the per-parameter post-accumulate-grad hooks (registered in ``hooks.py``). A bucket's reduction is
launched asynchronously the moment its last parameter's gradient is ready, so communication overlaps the rest of
backward (``overlap_comm``); the engine waits for all of them only at the optimizer step. What "reduce" means
(all-reduce, reduce-scatter into the owner's partition, accumulate across micro-steps) comes from the ``ZeroPolicy``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.zero.errors import outside_engine_error
from shardwise.zero.flat_buffer import FlatGroup
from shardwise.zero.policy import ZeroPolicy


@dataclass
class _InFlight:
    group: int
    bucket: int
    handle: comm.Handle
    source: torch.Tensor  # the reduced buffer (kept alive until the collective completes)
    temp: torch.Tensor | None  # reduce-scatter output to add into the partition (accumulating micro-steps)
    overwrite: bool  # first reduction of the window: replace the partition instead of adding
    wire: torch.Tensor  # what was communicated: ``source``, or a copy in the communication dtype


class GradReducer:
    """Bucketed, hook-driven gradient reduction for ZeRO stages 0-2."""

    def __init__(self, groups: list[FlatGroup], policy: ZeroPolicy, comm_group: Group) -> None:
        self.groups = groups
        self.policy = policy
        self.comm_group = comm_group
        self._reduce_now = False
        self._armed = False  # between begin_backward and end_backward
        self._fresh = True  # the next reduction overwrites the partition instead of adding to it
        self._pending: dict[tuple[int, int], int] = {}
        self._launched: set[tuple[int, int]] = set()
        self._staging: dict[tuple[int, int], torch.Tensor] = {}
        self._inflight: deque[_InFlight] = deque()
        self._touched: set[tuple[int, int]] = set()  # (group, param) that got a gradient in this window

    # -- called by the engine ---------------------------------------------------------------------------------------
    def begin_backward(self, reduce: bool) -> None:
        """Arm for one backward pass; ``reduce`` says whether this micro-step's gradients are communicated."""
        self._reduce_now = reduce or self.policy.reduce_every_micro_step
        if self._armed:  # the previous pass never ended (backward raised): drop what it left half-filled
            self._staging.clear()
        self._armed = True
        if self._reduce_now:
            self._launched.clear()
            self._pending = {
                (gi, b.index): len(b.params) for gi, g in enumerate(self.groups) for b in g.layout.buckets
            }

    def end_backward(self) -> None:
        """Launch every bucket not launched yet (unused parameters, or ``overlap_comm: false``)."""
        self._armed = False
        if not self._reduce_now:
            return
        for gi, g in enumerate(self.groups):
            for b in g.layout.buckets:
                if (gi, b.index) not in self._launched:
                    self._launch(gi, b.index)
        self._reduce_now = False
        self._fresh = False

    def wait_all(self) -> None:
        """Block until every launched reduction has landed in its destination."""
        while self._inflight:
            self._finalize(self._inflight.popleft())

    def reset_window(self) -> None:
        """Start a new accumulation window (after the optimizer step)."""
        self._fresh = True
        self._touched.clear()

    def untouched(self) -> list[tuple[int, int]]:
        """(group, param) indices that received no gradient in this accumulation window (unused parameters)."""
        return [(gi, pi) for gi, g in enumerate(self.groups) for pi in range(len(g.params))
                if (gi, pi) not in self._touched]

    # -- called by the hooks ----------------------------------------------------------------------------------------
    def on_grad_ready(self, gi: int, pi: int) -> None:
        """Parameter ``pi`` of group ``gi`` has its gradient for this backward pass."""
        g = self.groups[gi]
        p = g.params[pi]
        if not self._armed:
            raise outside_engine_error(p.shape)
        grad = p.grad
        self._touched.add((gi, pi))
        if self.policy.grads_are_param_views:
            view = g.param_view(g.full_grad, pi)
            if grad is not None and grad.data_ptr() != view.data_ptr():
                view.add_(grad)  # someone replaced p.grad (e.g. set_to_none); fold it back into the buffer
                p.grad = view
        else:
            if grad is not None:
                self._destination(gi, pi).add_(grad.view_as(p))
            p.grad = None
        if self._reduce_now:
            key = (gi, g.layout.slots[pi].bucket)
            self._pending[key] -= 1
            if self._pending[key] == 0 and self.policy.overlap_comm:
                self._launch(*key)

    # -- internals --------------------------------------------------------------------------------------------------
    def _destination(self, gi: int, pi: int) -> torch.Tensor:
        g = self.groups[gi]
        if not self.policy.reduce_every_micro_step:
            return g.param_view(g.full_grad, pi)
        key = (gi, g.layout.slots[pi].bucket)
        staging = self._staging.get(key)
        if staging is None:
            b = g.layout.buckets[key[1]]
            staging = self._staging[key] = torch.zeros(b.size, dtype=self.policy.grad_dtype, device=g.device)
        slot = g.layout.slots[pi]
        start = slot.offset - g.layout.buckets[slot.bucket].start
        return staging[start : start + slot.numel].view_as(g.params[pi])

    def _source(self, gi: int, b: int) -> torch.Tensor:
        g = self.groups[gi]
        if not self.policy.reduce_every_micro_step:
            return g.bucket_view(g.full_grad, b)
        staging = self._staging.pop((gi, b), None)
        if staging is None:  # no parameter of this bucket received a gradient this micro-step
            size = g.layout.buckets[b].size
            staging = torch.zeros(size, dtype=self.policy.grad_dtype, device=g.device)
        return staging

    def _launch(self, gi: int, b: int) -> None:
        self._launched.add((gi, b))
        g = self.groups[gi]
        source = self._source(gi, b)
        # communication_data_type: the bucket travels (and is summed) in another dtype, then comes back
        wire = source if self.policy.comm_dtype in (None, source.dtype) else source.to(self.policy.comm_dtype)
        temp = None
        if not self.policy.partitioned or not self.policy.use_reduce_scatter:
            handle = comm.all_reduce(wire, group=self.comm_group, async_op=True)
        else:
            out = g.part_view(g.part_grad, b)
            if not self._fresh or wire is not source:
                temp = out = torch.empty(out.numel(), dtype=wire.dtype, device=out.device)
            handle = comm.reduce_scatter_tensor(out, wire, group=self.comm_group, async_op=True)
        self._inflight.append(_InFlight(gi, b, handle, source, temp, self._fresh, wire))
        while len(self._inflight) > self.policy.max_inflight:
            self._finalize(self._inflight.popleft())

    def _finalize(self, entry: _InFlight) -> None:
        entry.handle.wait()
        g = self.groups[entry.group]
        if entry.wire is not entry.source and entry.temp is None:
            entry.source.copy_(entry.wire)  # all-reduced in the communication dtype
        if self.policy.partitioned and not self.policy.use_reduce_scatter:
            b = g.layout.buckets[entry.bucket]
            lo = g.rank * b.shard_size
            shard = entry.source[lo : lo + b.shard_size]
            part = g.part_view(g.part_grad, entry.bucket)
            part.copy_(shard) if entry.overwrite else part.add_(shard)
        elif entry.temp is not None:
            part = g.part_view(g.part_grad, entry.bucket)
            part.copy_(entry.temp) if entry.overwrite else part.add_(entry.temp)
