"""``Topology``: the only creator of process groups.

Built once from the parallel degrees (pipeline, data, sequence, tensor), it creates every group up front, in the
same order on every rank (torch requires that), and answers rank and group questions for all later parallelism.
Everything else receives a ``Topology`` or a ``Group``; nothing else does rank arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from shardwise.comm import grid
from shardwise.comm.group import Group

#: the groups every engine needs, created eagerly: name -> axes
STANDARD_GROUPS: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "sp": ("sp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "dp+sp": ("dp", "sp"),  # ZeRO partitions and averages over data x sequence ranks (they hold the same weights)
    "pp+tp": ("pp", "tp"),  # model-parallel ranks: each holds different weights (gradient-norm reductions)
    "dp+sp+tp": ("dp", "sp", "tp"),  # everything within one pipeline stage
}


class Topology:
    """The process grid of this job and its groups, as seen from this rank."""

    def __init__(self, *, pp: int = 1, tp: int = 1, sp: int = 1, dp: int | None = None,
                 world_size: int | None = None, rank: int | None = None, local_world_size: int | None = None,
                 create_groups: bool = True) -> None:
        initialized = dist.is_initialized()
        self.world_size = world_size or (dist.get_world_size() if initialized else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        self.sizes = grid.resolve_sizes(self.world_size, pp=pp, tp=tp, sp=sp, dp=dp)
        self.coords = grid.coords_of(self.rank, self.sizes)
        if local_world_size is None:
            from shardwise.comm.init import launch_env

            local_world_size = launch_env().local_world_size if initialized else self.world_size
        #: ranks per node; nodes hold consecutive ranks (as every launcher assigns them)
        self.local_world_size = max(1, min(local_world_size, self.world_size))
        self._groups: dict[str, Group] = {}
        self._single: dict[tuple[int, ...], Any] = {}  # one-rank torch groups, created on demand
        self._create = create_groups and initialized
        for name, axes in STANDARD_GROUPS.items():
            self._groups[name] = self._make(name, grid.axis_groups(axes, self.sizes))

    # -- construction ---------------------------------------------------------------------------------------------
    def _make(self, name: str, all_groups: list[tuple[int, ...]]) -> Group:
        """Create every group of a family (collectively), return the one containing this rank."""
        mine: Group | None = None
        for ranks in all_groups:
            pg: Any = None
            is_world = len(ranks) == self.world_size
            if self._create and len(ranks) > 1 and not is_world:
                pg = dist.new_group(list(ranks))  # every rank calls this for every group, in the same order
            if self.rank in ranks:
                mine = Group(name, ranks, pg=pg, is_world=is_world and self._create)
        assert mine is not None, f"rank {self.rank} is in no {name} group"
        return mine

    def subgroup(self, name: str, parent: str, size: int) -> Group:
        """Split each ``parent`` group into consecutive chunks of ``size`` ranks (collective on first use).

        Used by ZeRO++ hpZ: with ``size`` = ranks per node, each chunk stays inside a node.
        """
        key = f"{name}"
        if key not in self._groups:
            chunks = grid.chunk_groups(grid.axis_groups(STANDARD_GROUPS[parent], self.sizes), size)
            self._groups[key] = self._make(key, chunks)
        return self._groups[key]

    def custom_group(self, name: str, families: list[tuple[int, ...]]) -> Group:
        """Groups of arbitrary ranks (e.g. pipeline stages sharing a tied weight), created collectively.

        ``families`` lists disjoint rank tuples; every rank must pass the same list. A rank in no family gets a
        group of its own (no torch group, collectives over it return at once).
        """
        if name not in self._groups:
            covered = {r for f in families for r in f}
            if len(covered) != sum(len(f) for f in families):
                raise ValueError(f"custom group {name!r}: families overlap: {families}")
            rest = [(r,) for r in range(self.world_size) if r not in covered]
            self._groups[name] = self._make(name, [tuple(f) for f in families] + rest)
        return self._groups[name]

    def strided_subgroup(self, name: str, parent: str, size: int) -> Group:
        """Members of each ``parent`` group that sit at the same position of every chunk of ``size`` ranks.

        With ``size`` = ranks per node these are the cross-node peers (one rank per node), the partner of
        ``subgroup`` in hierarchical (hpZ) collectives.
        """
        if name not in self._groups:
            peers = grid.strided_groups(grid.axis_groups(STANDARD_GROUPS[parent], self.sizes), size)
            self._groups[name] = self._make(name, peers)
        return self._groups[name]

    # -- questions ------------------------------------------------------------------------------------------------
    def group(self, name: str) -> Group:
        """A group by name: tp, sp, dp, pp, dp+sp, pp+tp, dp+sp+tp, world, or a subgroup created earlier."""
        if name == "world":
            return Group("world", tuple(range(self.world_size)), pg=None, is_world=True)
        try:
            return self._groups[name]
        except KeyError:
            raise KeyError(f"no group named {name!r}; known: {sorted(self._groups)}") from None

    def torch_group(self, group: str | tuple[str, ...] | Group) -> Any:
        """The torch ProcessGroup of a group (by name, by axes such as ``("pp", "tp")``, or a ``Group`` of this
        topology), for code that calls ``torch.distributed`` directly (mpu facades hand these out).

        The world is ``dist.group.WORLD``. A one-rank group has no torch group in the ``Group`` (its collectives are
        no-ops), but torch would read None as the world, so one is created here on first use: only this rank takes
        part (``use_local_synchronization``). Without torch.distributed: None.
        """
        if isinstance(group, tuple):
            group = next((name for name, axes in STANDARD_GROUPS.items() if set(axes) == set(group)),
                         "+".join(group))
        g = group if isinstance(group, Group) else self.group(group)
        if not dist.is_initialized():
            return None
        if g.is_world or (g.size == self.world_size and g.pg is None):
            return dist.group.WORLD
        if g.pg is not None:
            return g.pg
        if g.ranks not in self._single:
            self._single[g.ranks] = dist.new_group(list(g.ranks), use_local_synchronization=True)
        return self._single[g.ranks]

    @property
    def tp_group(self) -> Group:
        """Tensor-parallel group."""
        return self._groups["tp"]

    @property
    def sp_group(self) -> Group:
        """Sequence-parallel (Ulysses) group."""
        return self._groups["sp"]

    @property
    def dp_group(self) -> Group:
        """Pure data-parallel group (same stage, same tensor and sequence slice)."""
        return self._groups["dp"]

    @property
    def pp_group(self) -> Group:
        """The ranks forming this rank's pipeline (one per stage)."""
        return self._groups["pp"]

    @property
    def zero_group(self) -> Group:
        """Where ZeRO partitions state and averages gradients: data x sequence ranks (identical weights)."""
        return self._groups["dp+sp"]

    @property
    def model_parallel_group(self) -> Group:
        """Ranks holding different weights (tensor x pipeline)."""
        return self._groups["pp+tp"]

    def size(self, axis: str) -> int:
        """Degree of one axis."""
        return self.sizes[axis]

    def coord(self, axis: str) -> int:
        """This rank's coordinate on one axis."""
        return self.coords[axis]

    def rank_at(self, **coords: int) -> int:
        """Global rank at the given coordinates; unspecified axes take this rank's coordinate."""
        merged = {**self.coords, **coords}
        return grid.rank_of(merged, self.sizes)

    def node_of(self, rank: int) -> int:
        """Index of the node hosting ``rank``."""
        return rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        """Number of nodes in the job."""
        return -(-self.world_size // self.local_world_size)

    def describe(self) -> str:
        """One line for the log."""
        s = self.sizes
        return (f"world={self.world_size} pp={s['pp']} dp={s['dp']} sp={s['sp']} tp={s['tp']} "
                f"nodes={self.num_nodes}x{self.local_world_size}")

    def __repr__(self) -> str:
        return f"Topology({self.describe()}, rank={self.rank}, coords={self.coords})"
