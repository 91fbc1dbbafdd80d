"""ZeRO-3 build: units from the module tree, their groups' shard buffers, persistence, prefetch limits, and the
first cut of every parameter into this rank's shard.

Every module's directly-owned parameters become one ``ParamUnit`` per optimizer group (and one for frozen ones);
a module subtree below the granularity threshold is one unit. Each unit keeps only this rank's shard, a view into
its group's shard buffer (``Stage3Group``), so the optimizer steps one flat fp32 master per group.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.config import ZeroConfig
from shardwise.zero.flat_buffer import copy_master, master_dtype
from shardwise.zero.init_context import full_param_values, full_shape
from shardwise.zero.layout import build_layout
from shardwise.zero.shard_comm import ShardComm
from shardwise.zero.sharded_param import attach
from shardwise.zero.unit import ParamUnit, UnitState

if TYPE_CHECKING:
    from shardwise.zero.stage3.strategy import Stage3Strategy


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
        self.master_is_shards = False  # the master weights are the shard storage itself (stepped in place)
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

    def allocate_master(self, device: torch.device, pin: bool = False, dtype: torch.dtype | None = None,
                        may_alias: bool = False) -> None:
        """Master weights of this rank's shards: fp32, or ``dtype`` (16-bit master weights).

        With ``may_alias`` (the optimizer is not offloaded), shards held in memory that already have the master
        dtype on ``device`` (an fp32 model) are stepped in place: a copy would only double them."""
        dtype = dtype or master_dtype(self.dtype)
        shards = self.store.view(0, self.total) if self.store.resident else None
        self.master_is_shards = bool(may_alias and not pin and shards is not None and shards.device == device
                                     and dtype == self.dtype == master_dtype(self.dtype))
        if self.master_is_shards:
            self.master = shards
            return
        self.master = copy_master(self.store.fetch(0, self.total), device, dtype, pin)

    @torch.no_grad()
    def publish_master(self, comm_group: Any, handles: list, max_inflight: int) -> None:
        """Updated masters -> shards; persistent units re-gather now, the others on their next fetch."""
        if not self.master_is_shards:  # (stepped in place otherwise)
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


def auto_granularity(model_numel: int, configured: int | None) -> int:
    """Elements below which a module subtree is one unit: the config's value if written (not None), else ~1/16 of
    the model (at least 1M elements), which makes each transformer block of a typical LLM one unit, as FSDP wraps
    them."""
    if configured is not None:
        return int(configured)
    return max(1_000_000, model_numel // 16)


def build_units(module: nn.Module, basic: torch.optim.Optimizer, shard_comm: ShardComm, zc: ZeroConfig
                ) -> tuple[list[ParamUnit], dict[nn.Module, list[ParamUnit]], dict[int, str]]:
    """(units, units by the module that fetches them, unit id -> that module's name)."""
    group_of = {id(p): gi for gi, g in enumerate(basic.param_groups) for p in g["params"]}
    granularity = auto_granularity(_subtree_numel(module), zc.written_value("stage3_module_granularity_threshold"))
    units: list[ParamUnit] = []
    owned: dict[nn.Module, list[ParamUnit]] = {}
    unit_root: dict[int, str] = {}
    for mname, root, suffix, params, key in _unit_params(module, group_of, granularity):
        layout = build_layout([full_shape(p).numel() for p in params], sys.maxsize, shard_comm.world)
        unit = ParamUnit(len(units), f"{mname or '<root>'}:{suffix}", params, layout, key is not None,
                         shard_comm, False, key)
        units.append(unit)
        owned.setdefault(root, []).append(unit)
        unit_root[unit.uid] = mname
    choose_persistent(units, zc)
    return units, owned, unit_root


def choose_persistent(units: list[ParamUnit], zc: ZeroConfig) -> None:
    """Units below ``stage3_param_persistence_threshold`` stay gathered, up to the model-wide budget."""
    threshold = int(zc.stage3_param_persistence_threshold)
    budget = int(zc.stage3_model_persistence_threshold)
    used = 0
    for u in sorted(units, key=lambda u: u.numel):
        if u.numel < threshold and used + u.numel <= budget:
            u.persistent = True
            used += u.numel


def prefetch_limits(units: list[ParamUnit], zc: ZeroConfig) -> tuple[int, int, int]:
    """(prefetch bucket, max live, reuse distance) in elements: the config's values where given, else sized
    from the units. DeepSpeed's defaults (5e7 / 1e9 / 1e9) keep every unit of a model below a billion
    parameters gathered for the whole step, so ZeRO-3 saves no parameter memory; ours prefetch the next unit
    (as FSDP2 does; one unit's gather is much shorter than its compute) and keep a unit only when it is
    needed again within that window (the last block at the forward/backward turnaround), so that at most
    two units are gathered at a time."""
    largest = max((u.numel for u in units), default=0)

    def pick(key: str, default: int) -> int:
        value = zc.written_value(key)
        return default if value is None else int(value)

    return (pick("stage3_prefetch_bucket_size", largest), pick("stage3_max_live_parameters", 10**18),
            pick("stage3_max_reuse_distance", largest))


def module_units(module: nn.Module, owned: dict[nn.Module, list[ParamUnit]], unit_root: dict[int, str],
                 param_unit: dict[int, ParamUnit]) -> dict[nn.Module, list[ParamUnit]]:
    """The units each module's forward fetches: those rooted at it, plus units of its own (or registered
    external) parameters that no enclosing root already fetches."""
    def inside(module_name: str, unit: ParamUnit) -> bool:
        root = unit_root[unit.uid]
        return root == "" or module_name == root or module_name.startswith(root + ".")

    out: dict[nn.Module, list[ParamUnit]] = {}
    for name, m in module.named_modules():
        units = list(owned.get(m, [])) + [u for u in direct_units(m, param_unit) if not inside(name, u)]
        if units:
            out[m] = list(dict.fromkeys(units))
    return out


def direct_units(m: nn.Module, param_unit: dict[int, ParamUnit]) -> list[ParamUnit]:
    """Units of ``m``'s own parameters and of those registered as its external parameters."""
    units: list[ParamUnit] = []
    params = list(m.parameters(recurse=False)) + list(getattr(m, "_sw_external_params", ()))
    for p in params:
        u = param_unit.get(id(p))
        if u is not None and u not in units:
            units.append(u)
    return units


@torch.no_grad()
def materialize_shards(units: list[ParamUnit], group: Group, strategy: Stage3Strategy) -> None:
    """Cut each unit's full values (from the model, or from ``zero.Init`` shards) into this rank's shard."""
    for u in units:
        full = torch.zeros(u.layout.total, dtype=u.dtype, device=u.device)
        from_init = False
        for slot, p in zip(u.layout.slots, u.params):
            values, was_sharded = full_param_values(p, group)
            from_init |= was_sharded
            full[slot.offset : slot.offset + slot.numel].copy_(values.reshape(-1))
            if was_sharded:  # the unit's store holds it from now on: drop zero.Init's copy of the shard
                del p._sw_init_shard
        if not from_init:  # every replica starts from the first rank's weights
            comm.broadcast(full, src=group.global_rank(0), group=group)
        if u.persistent:
            u.materialize_full(full)
        else:
            lo, hi = u.shard_range
            u.store.write(u.shard_offset, full[lo:hi])
            for p, empty in zip(u.params, u._empty):
                p.data = empty
        for p in u.params:
            attach(p, u, strategy)
