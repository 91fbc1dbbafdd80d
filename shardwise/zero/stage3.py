"""``Stage3Strategy``: ZeRO stage 3, parameters partitioned and gathered around each module's forward and backward.

Build: every module's directly-owned parameters become one ``ParamUnit`` per optimizer group (and one for frozen
ones); each unit keeps only this rank's shard, a view into its group's shard buffer, so the optimizer steps one
flat fp32 master per group (reusing ``FlatOptimizer``). Small units (``stage3_param_persistence_threshold``) stay
gathered. Run: module hooks (``hooks.py``) fetch units before forward and before backward, release them after;
``FetchTrace`` prefetches the next units; gradient hooks reduce-scatter a unit's flat gradient as soon as its last
gradient is ready. See the class docstrings of ``ParamUnit`` and ``ShardComm`` for the mechanics.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.zero import hooks
from shardwise.zero.flat_buffer import master_dtype
from shardwise.zero.flat_optimizer import FlatOptimizer
from shardwise.zero.fragments import Fragment, optimizer_state_slices
from shardwise.zero.init_context import full_shape
from shardwise.zero.layout import build_layout
from shardwise.zero.optimizer_offload import SwappedAdam
from shardwise.zero.param_offload import make_store
from shardwise.zero.policy import ZeroPolicy
from shardwise.zero.prefetch import FetchTrace
from shardwise.zero.unit import ParamUnit, UnitState


class Stage3Group:
    """One optimizer group's shards (model dtype, in a ``param_offload`` store), reduced gradient shards and fp32
    master, units back to back."""

    def __init__(self, units: list[ParamUnit], grad_dtype: torch.dtype | None, store_factory: Any) -> None:
        self.units = units
        self.dtype, self.device = units[0].dtype, units[0].device
        total = sum(u.shard_numel for u in units)
        self.store = store_factory(total, self.dtype)
        self.part_grad = torch.zeros(total, dtype=grad_dtype, device=self.device) if grad_dtype else None
        self.full_grad = None
        self.master: torch.Tensor | None = None
        offset = 0
        for u in units:
            u.store = self.store
            u.shard_offset = offset
            offset += u.shard_numel
        self.total = total

    @property
    def shards(self) -> torch.Tensor | None:
        """All shards of the group (None when they live in a file)."""
        return self.store.view(0, self.total)

    def allocate_master(self, device: torch.device, pin: bool = False, dtype: torch.dtype | None = None) -> None:
        """Master weights of this rank's shards: fp32, or ``dtype`` (16-bit master weights)."""
        values = self.store.fetch(0, self.total)
        master = values.detach().to(device=device, dtype=dtype or master_dtype(self.dtype), copy=True)
        if pin and device.type == "cpu":
            from shardwise.accelerator import get_accelerator

            master = get_accelerator().pin_memory(master)
        self.master = master

    @torch.no_grad()
    def publish_master(self, comm_group: Any, handles: list, max_inflight: int) -> None:
        """Updated masters -> shards; persistent units re-gather now, the others on their next fetch."""
        self.store.write(0, self.master.to(device=self.device, dtype=self.dtype, non_blocking=True))
        for u in self.units:
            u.comm.invalidate(u.cache)
            if u.state is UnitState.GATHERED:
                handles.append(u.refresh())

    def numel(self) -> int:
        """Parameter elements of the group (padding excluded)."""
        return sum(u.numel for u in self.units)


def _subtree_numel(m: nn.Module) -> int:
    return sum(full_shape(p).numel() for p in m.parameters())


def _unit_params(module: nn.Module, group_of: dict[int, int], granularity: int
                 ) -> list[tuple[str, nn.Module, str, list[nn.Parameter], int | None]]:
    """(root name, root module, suffix, params, optimizer group or None) of every unit.

    A module whose whole subtree holds at most ``granularity`` elements is fetched as one unit (its root); above
    that, a module's own parameters form its units and its children are visited. One all-gather per transformer
    block instead of one per Linear/LayerNorm: far fewer, larger collectives.
    """
    seen: set[int] = set()
    out = []

    def visit(name: str, m: nn.Module) -> None:
        integral = _subtree_numel(m) <= granularity
        buckets: dict[Any, list[nn.Parameter]] = {}
        for p in (m.parameters() if integral else m.parameters(recurse=False)):
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = group_of.get(id(p)) if p.requires_grad else None
            buckets.setdefault(key, []).append(p)
        for key, params in buckets.items():
            out.append((name, m, "frozen" if key is None else f"group{key}", params, key))
        if not integral:
            for child_name, child in m.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", module)
    return out


def auto_granularity(model_numel: int, configured: int, explicit: bool) -> int:
    """Elements below which a module subtree is one unit: the config's value if set, else ~1/16 of the model
    (at least 1M elements), which makes each transformer block of a typical LLM one unit, as FSDP wraps them."""
    if explicit:
        return int(configured)
    return max(1_000_000, model_numel // 16)


class Stage3Strategy:
    """The strategy protocol (see ``flat_strategy.py``) for ZeRO stage 3."""

    def __init__(self, module: nn.Module, basic: torch.optim.Optimizer, policy: ZeroPolicy, group: Group,
                 shard_comm: Any, zero_config: Any, explicit: Collection[str]) -> None:
        self.policy, self.group, self.name = policy, group, "ZeRO-3"
        self.module = module
        self.shard_comm = shard_comm
        world = shard_comm.world
        group_of = {id(p): gi for gi, g in enumerate(basic.param_groups) for p in g["params"]}
        granularity = auto_granularity(_subtree_numel(module), zero_config.stage3_module_granularity_threshold,
                                       "stage3_module_granularity_threshold" in explicit)
        self.units: list[ParamUnit] = []
        owned: dict[nn.Module, list[ParamUnit]] = {}
        self._unit_root: dict[int, str] = {}
        for mname, root, suffix, params, key in _unit_params(module, group_of, granularity):
            layout = build_layout([full_shape(p).numel() for p in params], sys.maxsize, world)
            unit = ParamUnit(len(self.units), f"{mname or '<root>'}:{suffix}", params, layout, key is not None,
                             shard_comm, False, key)
            self.units.append(unit)
            owned.setdefault(root, []).append(unit)
            self._unit_root[unit.uid] = mname
        self.param_unit = {id(p): u for u in self.units for p in u.params}
        self._choose_persistent(zero_config)
        self._io_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shardwise-nvme")
        offload = zero_config.offload_param

        def store_factory(name: str) -> Any:
            return lambda numel, dtype: make_store(numel, dtype, self.units[0].device, offload, name, self._io_pool)

        self.groups: list[Stage3Group | None] = []
        for gi in range(len(basic.param_groups)):
            members = [u for u in self.units if u.group_index == gi]
            group = Stage3Group(members, policy.grad_dtype, store_factory(f"group{gi}")) if members else None
            self.groups.append(group)
        frozen = [u for u in self.units if u.group_index is None]
        self.frozen_group = Stage3Group(frozen, None, store_factory("frozen")) if frozen else None
        self.readahead = int(getattr(offload, "buffer_count", 0) or 0) if offload is not None else 0
        self._materialize_shards()
        oo = zero_config.offload_optimizer
        for g in self.groups:  # (NVMe optimizer offload streams the masters into their files instead)
            if g is not None and not (oo is not None and oo.device == "nvme"):
                g.allocate_master(torch.device("cpu") if policy.offload_optimizer else g.device, policy.pin_memory,
                                  policy.master_dtype)
        if oo is not None and oo.device == "nvme":
            if not oo.nvme_path:
                raise ValueError("zero_optimization.offload_optimizer.device is 'nvme' but nvme_path is not set")
            self.optimizer = SwappedAdam(basic, self.groups, policy, group, oo.nvme_path,
                                         int(zero_config.sub_group_size), self._io_pool)
        else:
            self.optimizer = FlatOptimizer(basic, self.groups, policy, group)
        self.trace = FetchTrace(*self._prefetch_limits(zero_config, explicit))
        self.module_units: dict[nn.Module, list[ParamUnit]] = {}
        for name, m in module.named_modules():
            units = list(owned.get(m, [])) + [u for u in self._direct_units(m) if not self._inside(name, u)]
            if units:
                self.module_units[m] = list(dict.fromkeys(units))
        self._live: set[ParamUnit] = {u for u in self.units if u.state is not UnitState.SHARDED}
        self._inflight: deque = deque()
        self._fresh = True
        self._in_backward = False
        self._new_micro_step = True
        self.active_modules: list[nn.Module] = []
        self.internal = 0  # > 0 while the strategy itself rebinds parameters (the external-use detector ignores it)
        self._hooks = hooks.register_stage3_hooks(self)

    # -- build ------------------------------------------------------------------------------------------------------
    def _choose_persistent(self, zc: Any) -> None:
        """Units below ``stage3_param_persistence_threshold`` stay gathered, up to the model-wide budget."""
        threshold = int(zc.stage3_param_persistence_threshold)
        budget = int(zc.stage3_model_persistence_threshold)
        used = 0
        for u in sorted(self.units, key=lambda u: u.numel):
            if u.numel < threshold and used + u.numel <= budget:
                u.persistent = True
                used += u.numel

    def _inside(self, module_name: str, unit: ParamUnit) -> bool:
        """Whether ``module_name`` lies in the subtree that fetches ``unit`` (its root or a descendant)."""
        root = self._unit_root[unit.uid]
        return root == "" or module_name == root or module_name.startswith(root + ".")

    def _prefetch_limits(self, zc: Any, explicit: Collection[str]) -> tuple[int, int, int]:
        """(prefetch bucket, max live, reuse distance) in elements: the config's values where given, else sized
        from the units. DeepSpeed's defaults (5e7 / 1e9 / 1e9) keep every unit of a model below a billion
        parameters gathered for the whole step, so ZeRO-3 saves no parameter memory; ours prefetch the next unit
        (as FSDP2 does; one unit's gather is much shorter than its compute) and keep a unit only when it is
        needed again within that window (the last block at the forward/backward turnaround), so that at most
        two units are gathered at a time."""
        largest = max((u.numel for u in self.units), default=0)

        def pick(key: str, default: int) -> int:
            return int(getattr(zc, key)) if key in explicit else default

        return (pick("stage3_prefetch_bucket_size", largest), pick("stage3_max_live_parameters", 10**18),
                pick("stage3_max_reuse_distance", largest))

    def _direct_units(self, m: nn.Module) -> list[ParamUnit]:
        units: list[ParamUnit] = []
        params = list(m.parameters(recurse=False)) + list(getattr(m, "_sw_external_params", ()))
        for p in params:
            u = self.param_unit.get(id(p))
            if u is not None and u not in units:
                units.append(u)
        return units

    @torch.no_grad()
    def _materialize_shards(self) -> None:
        """Cut each unit's full values (from the model, or from ``zero.Init`` shards) into this rank's shard."""
        from shardwise.zero.init_context import full_param_values

        for u in self.units:
            full = torch.zeros(u.layout.total, dtype=u.dtype, device=u.device)
            from_init = False
            for slot, p in zip(u.layout.slots, u.params):
                values, was_sharded = full_param_values(p, self.group)
                from_init |= was_sharded
                full[slot.offset : slot.offset + slot.numel].copy_(values.reshape(-1))
                if was_sharded:  # the unit's store holds it from now on: drop zero.Init's copy of the shard
                    del p._sw_init_shard
            if not from_init:  # every replica starts from the first rank's weights
                comm.broadcast(full, src=self.group.global_rank(0), group=self.group)
            if u.persistent:
                u.materialize_full(full)
            else:
                lo, hi = u.shard_range
                u.store.write(u.shard_offset, full[lo:hi])
                for p, empty in zip(u.params, u._empty):
                    p.data = empty
            for p in u.params:
                hooks.mark_zero3_param(p, u, self)

    # -- fetch / release ----------------------------------------------------------------------------------------
    def fetch(self, units: list[ParamUnit]) -> None:
        """Make ``units`` gathered (recording the order and prefetching what the trace says comes next)."""
        self.internal += 1
        try:
            self._fetch(units)
        finally:
            self.internal -= 1

    def _fetch(self, units: list[ParamUnit]) -> None:
        # backward runs with grad mode off: the engine's begin/end_backward mark it, so backward fetches are
        # recorded (and prefetched) too
        recording = self.module.training and (torch.is_grad_enabled() or self._in_backward)
        if recording:
            for u in units:
                self.trace.on_fetch(u)
            live = sum(u.numel for u in self._live)
            for v in self.trace.upcoming(live, lambda x: x.state is not UnitState.SHARDED):
                v.gather(async_op=True)
                self._live.add(v)
            if self.readahead:  # NVMe: start reading the shards of the next units from disk
                for v in self.trace.lookahead(self.readahead):
                    v.prefetch_shard()
        for u in units:
            u.gather(async_op=False)
            self._live.add(u)

    def release(self, units: list[ParamUnit]) -> None:
        """Drop full parameters no longer needed (persistent and soon-reused units stay)."""
        self.internal += 1
        try:
            self._release(units)
        finally:
            self.internal -= 1

    def _release(self, units: list[ParamUnit]) -> None:
        for u in units:
            if u.persistent or u.state is UnitState.SHARDED or self.trace.needed_soon(u):
                continue
            u.release()
            self._live.discard(u)

    def release_all(self) -> None:
        """Release every non-persistent unit (end of backward, before the optimizer step)."""
        for u in list(self._live):
            if not u.persistent:
                u.release()
                self._live.discard(u)

    def before_forward(self) -> None:
        """Called by the engine before each forward: a new micro-step's trace starts after a backward."""
        if self._new_micro_step and torch.is_grad_enabled() and self.module.training:
            self.trace.start_micro_step()
            self._new_micro_step = False

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Detect parameters used outside their module during forward (``external.py``)."""
        from shardwise.zero.external import ExternalParameterMode
        from shardwise.zero.saved_params import saved_param_hooks

        with ExternalParameterMode(self), saved_param_hooks(self):
            yield

    def register_external_units(self, module: nn.Module, units: list[ParamUnit]) -> None:
        """``module``'s forward uses ``units`` too: fetch them with it from now on."""
        known = self.module_units.get(module)
        if known is None:
            self.module_units[module] = known = []
            self._hooks.extend(hooks.add_module_hooks(self, module))
        for u in units:
            if u not in known:
                known.append(u)

    # -- backward ---------------------------------------------------------------------------------------------------
    def pre_backward(self, units: list[ParamUnit]) -> None:
        """Before a module's backward: its units gathered, their gradients pointed at flat buffers."""
        self.fetch(units)
        for u in units:
            u.attach_grads(self.policy.grad_dtype)

    def on_grad_ready(self, unit: ParamUnit, index: int) -> None:
        """A parameter's gradient for this backward is complete; reduce the unit once all of them are."""
        if not self._in_backward:
            raise hooks.outside_engine_error(unit.shapes[index])
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
        self._in_backward = True
        for u in self.units:
            if u.trainable:
                u.pending_grads = len(u.params)

    def end_backward(self) -> None:
        """Reduce units whose gradients did not all arrive (unused parameters), release everything."""
        for u in self.units:
            if u.trainable and u.pending_grads != -1:
                self._reduce(u)
        self.release_all()
        self._in_backward = False
        self._fresh = False
        self._new_micro_step = True

    def finish_gradients(self) -> None:
        """Wait for every reduce-scatter of this window."""
        while self._inflight:
            self._finalize(self._inflight.popleft())

    # -- the rest of the strategy protocol ----------------------------------------------------------------------
    def local_grad_norm_sq(self) -> torch.Tensor:
        """Squared norm of this rank's reduced gradient shards."""
        return self.optimizer.local_norm_sq()

    norm_is_partitioned = True

    def scale_grads(self, factor: float) -> None:
        """Averaging, unscaling and clipping in one multiply."""
        self.optimizer.scale_grads(factor)

    def optimizer_step(self) -> None:
        """Step the fp32 masters, cast them into the shards, refresh persistent units."""
        self.optimizer.step()


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

    def zero_grad(self) -> None:
        """Start a new accumulation window."""
        for g in self.optimizer.live_groups:
            g.part_grad.zero_()
        self._fresh = True

    def remove_hooks(self) -> None:
        """Detach from the module."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- state access -------------------------------------------------------------------------------------------
    @property
    def state_group(self) -> Group:
        """Every rank of the ZeRO group holds one shard of each unit."""
        return self.group

    def fragments(self, param: nn.Parameter) -> list[Fragment]:
        """This rank's piece of ``param``: its overlap with the unit's shard."""
        u = self.param_unit.get(id(param))
        if u is None:
            return []
        i = param._sw_index
        slot = u.layout.slots[i]
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

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds for model states (persistent full copies counted under parameters)."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel() * t.element_size()

        groups = [g for g in self.groups if g is not None] + ([self.frozen_group] if self.frozen_group else [])
        params = sum(g.store.resident_bytes for g in groups) + sum(size(u.full) for u in self.units if u.persistent)
        grads = sum(size(g.part_grad) for g in groups)
        master = sum(size(g.master) for g in groups)  # 0 with NVMe optimizer offload (masters on disk)
        state = sum(size(v) for st in self.optimizer.basic.state.values() for v in st.values()
                    if torch.is_tensor(v) and v.numel() > 1)
        return {"parameters": params, "gradients": grads, "master_weights": master, "optimizer_states": state}

    def describe(self) -> str:
        """One line for the log."""
        persistent = sum(u.numel for u in self.units if u.persistent)
        total = sum(u.numel for u in self.units)
        kind = type(self.shard_comm).__name__
        return (f"ZeRO-3: {total:,} elements in {len(self.units)} units ({persistent:,} persistent); group "
                f"{self.group!r}; {kind}; grads reduce in {str(self.policy.grad_dtype).replace('torch.', '')}"
                f"{'; optimizer on host' if self.policy.offload_optimizer else ''}")
