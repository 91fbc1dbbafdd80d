"""ZeRO-3's state access: this rank's fragments of a parameter (checkpoints, ``safe_get_*``), republishing the
shards from the fp32 masters, memory accounting and the log line."""

from __future__ import annotations

from torch import nn

from shardwise.comm.group import Group
from shardwise.zero.flat_optimizer import FlatOptimizer
from shardwise.zero.fragments import Fragment, optimizer_state_slices
from shardwise.zero.optimizer_offload import SwappedAdam
from shardwise.zero.policy import ZeroPolicy
from shardwise.zero.shard_comm import ShardComm
from shardwise.zero.sharded_param import sharded
from shardwise.zero.stage3.build import Stage3Group
from shardwise.zero.strategy_base import tensor_bytes
from shardwise.zero.unit import ParamUnit, UnitState


class StateAccess:
    """The state half of ``Stage3Strategy`` (the attributes are set by its ``__init__``)."""

    policy: ZeroPolicy
    group: Group
    shard_comm: ShardComm
    units: list[ParamUnit]
    param_unit: dict[int, ParamUnit]
    groups: list[Stage3Group | None]
    frozen_group: Stage3Group | None
    optimizer: FlatOptimizer

    def publish_weights(self) -> None:
        """Shards from the fp32 masters (after they were written, e.g. by a load); gathered units re-gather,
        including frozen ones, whose shards were written directly."""
        self.optimizer.publish()
        if self.frozen_group is not None:
            handles = []
            for u in self.frozen_group.units:
                u.comm.invalidate(u.cache)
                if u.state is UnitState.GATHERED:
                    handles.append(u.refresh())
            for h in handles:
                h.wait()

    def fragments(self, param: nn.Parameter) -> list[Fragment]:
        """This rank's piece of ``param``: its overlap with the unit's shard."""
        u = self.param_unit.get(id(param))
        if u is None:
            return []
        slot = u.layout.slots[sharded(param).index]
        lo, hi = u.shard_range
        start, end = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
        if start >= end:
            return []
        off = u.shard_offset + (start - lo)
        n = end - start
        if u.group_index is None:
            model = self.frozen_group.store.view(off, n)
            return [Fragment(start - slot.offset, end - slot.offset, None, model, None, {})]
        g = self.groups[u.group_index]
        if isinstance(self.optimizer, SwappedAdam):
            master, state = self.optimizer.state_for(u.group_index, off, n)
        else:
            master = g.master[off : off + n]
            state = optimizer_state_slices(self.optimizer.basic.state.get(g.master, {}), off, n, g.master.numel())
        return [Fragment(start - slot.offset, end - slot.offset, master, g.store.view(off, n),
                         g.part_grad[off : off + n], state)]

    def _held_bytes(self) -> tuple[int, int, int]:
        """Persistent units' full copies count under parameters; masters are 0 with NVMe optimizer offload or when
        they are the fp32 shards themselves."""
        groups = [g for g in self.groups if g is not None] + ([self.frozen_group] if self.frozen_group else [])
        params = sum(g.store.resident_bytes for g in groups) + sum(tensor_bytes(u.full) for u in self.units
                                                                   if u.persistent)
        masters = sum(tensor_bytes(g.master) for g in groups if not g.master_is_shards)
        return params, sum(tensor_bytes(g.part_grad) for g in groups), masters

    def sync_initial_weights(self, src: int) -> set[int]:
        """Nothing left to do: every unit was broadcast from the ZeRO group's first rank while partitioning."""
        return {id(p) for u in self.units for p in u.params}

    def describe(self) -> str:
        """One line for the log."""
        persistent = sum(u.numel for u in self.units if u.persistent)
        total = sum(u.numel for u in self.units)
        kind = type(self.shard_comm).__name__
        return (f"ZeRO-3: {total:,} elements in {len(self.units)} units ({persistent:,} persistent); group "
                f"{self.group!r}; {kind}; grads reduce in {str(self.policy.grad_dtype).replace('torch.', '')}"
                f"{'; optimizer on host' if self.policy.offload_optimizer else ''}")
