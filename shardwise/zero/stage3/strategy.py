"""``Stage3Strategy``: ZeRO stage 3, assembled from the package's parts (see ``__init__.py``) on the shared
``StrategyBase``; this module holds only the construction and the optimizer-facing calls."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from shardwise.comm.group import Group
from shardwise.config import ZeroConfig
from shardwise.zero import hooks
from shardwise.zero.flat_optimizer import FlatOptimizer
from shardwise.zero.optimizer_offload import SwappedAdam
from shardwise.zero.param_offload import make_store
from shardwise.zero.policy import ZeroPolicy
from shardwise.zero.prefetch import FetchTrace
from shardwise.zero.shard_comm import ShardComm
from shardwise.zero.stage3.build import (
    Stage3Group,
    build_units,
    materialize_shards,
    module_units,
    prefetch_limits,
)
from shardwise.zero.stage3.fetch import FetchRelease, Phase
from shardwise.zero.stage3.reduce import GradReduction
from shardwise.zero.stage3.state import StateAccess
from shardwise.zero.strategy_base import StrategyBase
from shardwise.zero.unit import ParamUnit, UnitState


class Stage3Strategy(FetchRelease, GradReduction, StateAccess, StrategyBase):
    """The ``ShardingStrategy`` (``engine/strategy.py``) for ZeRO stage 3."""

    def __init__(self, module: nn.Module, basic: torch.optim.Optimizer, policy: ZeroPolicy, group: Group,
                 shard_comm: ShardComm, zero_config: ZeroConfig) -> None:
        self.policy, self.group, self.name = policy, group, "ZeRO-3"
        self.module = module
        self.shard_comm = shard_comm
        self.units, owned, unit_root = build_units(module, basic, shard_comm, zero_config)
        self.param_unit = {id(p): u for u in self.units for p in u.params}
        self._io_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shardwise-nvme")
        self._build_groups(basic, zero_config)
        materialize_shards(self.units, group, self)
        oo = zero_config.offload_optimizer
        for g in self.groups:  # (NVMe optimizer offload streams the masters into their files instead)
            if g is not None and not (oo is not None and oo.device == "nvme"):
                g.allocate_master(torch.device("cpu") if policy.offload_optimizer else g.device, policy.pin_memory,
                                  policy.master_dtype, may_alias=not policy.offload_optimizer)
        self.optimizer = self._build_optimizer(basic, zero_config)
        self.trace = FetchTrace(*prefetch_limits(self.units, zero_config))
        self.module_units = module_units(module, owned, unit_root, self.param_unit)
        self._live: set[ParamUnit] = {u for u in self.units if u.state is not UnitState.SHARDED}
        self._inflight: deque = deque()
        self._fresh = True
        self.phase = Phase.IDLE
        self.active_modules: list[nn.Module] = []
        self.internal = 0  # > 0 while the strategy itself rebinds parameters (the external-use detector ignores it)
        self._hooks = hooks.register_stage3_hooks(self)

    def _build_groups(self, basic: torch.optim.Optimizer, zc: ZeroConfig) -> None:
        """One ``Stage3Group`` (shard store, gradient shards) per optimizer group, and one for frozen units."""
        offload = zc.offload_param

        def store_factory(name: str) -> Callable:
            return lambda numel, dtype: make_store(numel, dtype, self.units[0].device, offload, name, self._io_pool)

        self.groups: list[Stage3Group | None] = []
        for gi in range(len(basic.param_groups)):
            members = [u for u in self.units if u.group_index == gi]
            self.groups.append(Stage3Group(members, self.policy.grad_dtype, store_factory(f"group{gi}"))
                               if members else None)
        frozen = [u for u in self.units if u.group_index is None]
        self.frozen_group = Stage3Group(frozen, None, store_factory("frozen")) if frozen else None
        self.readahead = int(getattr(offload, "buffer_count", 0) or 0) if offload is not None else 0

    def _build_optimizer(self, basic: torch.optim.Optimizer, zc: ZeroConfig) -> FlatOptimizer:
        oo = zc.offload_optimizer
        if oo is not None and oo.device == "nvme":
            if not oo.nvme_path:
                raise ValueError("zero_optimization.offload_optimizer.device is 'nvme' but nvme_path is not set")
            return SwappedAdam(basic, self.groups, self.policy, self.group, oo.nvme_path, int(zc.sub_group_size),
                               self._io_pool)
        return FlatOptimizer(basic, self.groups, self.policy, self.group)
