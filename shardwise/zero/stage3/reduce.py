"""ZeRO-3's gradient reduction: count each unit's gradients in a backward, reduce-scatter a unit's flat gradient
into this rank's shard as soon as the last one is ready, and finish the window's reductions before the step.

The first backward of an accumulation window overwrites the reduced-gradient shards, later ones add to them.
"""

from __future__ import annotations

from collections import deque

import torch

from shardwise.zero.errors import outside_engine_error
from shardwise.zero.flat_optimizer import FlatOptimizer
from shardwise.zero.policy import ZeroPolicy
from shardwise.zero.stage3.build import Stage3Group
from shardwise.zero.stage3.fetch import Phase
from shardwise.zero.unit import ParamUnit


class GradReduction:
    """The backward half of ``Stage3Strategy`` (the attributes are set by its ``__init__``)."""

    policy: ZeroPolicy
    units: list[ParamUnit]
    groups: list[Stage3Group | None]
    optimizer: FlatOptimizer
    phase: Phase
    _inflight: deque
    _live: set[ParamUnit]
    _fresh: bool
    """The current backward is the first of its accumulation window: reductions overwrite instead of adding."""

    def pre_backward(self, units: list[ParamUnit]) -> None:
        """Before a module's backward: its units gathered, their gradients pointed at flat buffers."""
        self.fetch(units)
        for u in units:
            u.attach_grads(self.policy.grad_dtype)

    def on_grad_ready(self, unit: ParamUnit, index: int) -> None:
        """A parameter's gradient for this backward is complete; reduce the unit once all of them are."""
        if self.phase is not Phase.BACKWARD:
            raise outside_engine_error(unit.shapes[index])
        if unit.grad_full is None:
            unit.attach_grads(self.policy.grad_dtype)
        unit.absorb_grad(index)
        unit.pending_grads -= 1
        if unit.pending_grads == 0 and self.policy.overlap_comm:
            self._reduce(unit)

    def _reduce(self, unit: ParamUnit) -> None:
        group = self.groups[unit.group_index]
        out = group.part_grad[unit.shard_offset : unit.shard_offset + unit.shard_numel]
        grads = unit.take_grads().to(self.policy.comm_dtype or group.part_grad.dtype)
        temp = None
        if not self._fresh or grads.dtype != out.dtype:
            temp = out = torch.empty(out.numel(), dtype=grads.dtype, device=out.device)
        handle = unit.comm.reduce_scatter(out, grads, async_op=True)
        unit.pending_grads = -1  # reduced for this backward
        self._inflight.append((handle, grads, temp, unit, self._fresh))
        if not unit.persistent:
            unit.release()
            self._live.discard(unit)
        while len(self._inflight) > self.policy.max_inflight:
            self._finalize(self._inflight.popleft())

    def _finalize(self, entry: tuple) -> None:
        handle, _grads, temp, unit, overwrite = entry
        handle.wait()
        if temp is not None:
            group = self.groups[unit.group_index]
            part = group.part_grad[unit.shard_offset : unit.shard_offset + unit.shard_numel]
            part.copy_(temp) if overwrite else part.add_(temp)

    def begin_backward(self, boundary: bool) -> None:
        """Count the gradients each trainable unit expects in this backward."""
        if self.phase is Phase.BACKWARD:  # the previous pass never ended (backward raised): drop its partial grads
            for u in self.units:
                if u.trainable and u.pending_grads != -1:
                    u.take_grads()
        self.phase = Phase.BACKWARD
        for u in self.units:
            if u.trainable:
                u.pending_grads = len(u.params)

    def end_backward(self) -> None:
        """Reduce units whose gradients did not all arrive (unused parameters), release everything."""
        for u in self.units:
            if u.trainable and u.pending_grads != -1:
                self._reduce(u)
        self.release_all()
        self.phase = Phase.IDLE
        self._fresh = False

    def finish_gradients(self) -> None:
        """Wait for every reduce-scatter of this window."""
        while self._inflight:
            self._finalize(self._inflight.popleft())

    def zero_grad(self) -> None:
        """Start a new accumulation window."""
        for g in self.optimizer.live_groups:
            g.part_grad.zero_()
        self._fresh = True
