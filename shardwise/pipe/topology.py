"""DeepSpeed's process-topology classes (``deepspeed.runtime.pipe.topology``) as pure coordinate math.

``ProcessTopology(axes, dims)`` maps row-major coordinates to ranks (the last axis varies fastest);
``PipeDataParallelTopology(num_pp, num_dp)`` and ``PipeModelDataParallelTopology(num_pp, num_mp, num_dp)`` are the
pipeline layouts users pass to ``PipelineModule(topology=...)``. They create no process groups: the engine turns
them into a ``shardwise.comm.topology.Topology`` (``to_degrees``), the only owner of groups. Axis names:
``pipe`` -> pp, ``data`` -> dp, ``model`` -> tp.
"""

from __future__ import annotations

import itertools
from collections import namedtuple
from typing import Any

__all__ = ["ProcessTopology", "PipeDataParallelTopology", "PipeModelDataParallelTopology", "to_degrees"]

#: DeepSpeed axis name -> shardwise grid axis
AXIS_NAMES = {"pipe": "pp", "data": "dp", "model": "tp"}
#: shardwise's fixed outer -> inner order, in DeepSpeed names
_ORDER = ["pipe", "data", "model"]


class ProcessTopology:
    """Named Cartesian axes over the ranks, row-major (``deepspeed.runtime.pipe.ProcessTopology``)."""

    def __init__(self, axes: list[str], dims: list[int]) -> None:
        if len(axes) != len(dims):
            raise ValueError(f"axes {axes} and dims {dims} must have the same length")
        if len(set(axes)) != len(axes):
            raise ValueError(f"axis names must be unique, got {axes}")
        self.axes = list(axes)
        self.dims = [int(d) for d in dims]
        self.ProcessCoord = namedtuple("ProcessCoord", self.axes)
        self.mapping = {
            self.ProcessCoord(*coord): rank
            for rank, coord in enumerate(itertools.product(*(range(d) for d in self.dims)))
        }

    def get_rank(self, **coord_kwargs: int) -> int:
        """Rank at fully specified coordinates (use ``filter_match`` for partial ones)."""
        if set(coord_kwargs) != set(self.axes):
            raise ValueError(f"get_rank() needs every axis {self.axes}, got {sorted(coord_kwargs)}; "
                             "use filter_match() for a partial match")
        key = self.ProcessCoord(**coord_kwargs)
        if key not in self.mapping:
            raise ValueError(f"coordinates {coord_kwargs} are outside dims {dict(zip(self.axes, self.dims))}")
        return self.mapping[key]

    def get_axis_names(self) -> list[str]:
        """Axis names, outermost first."""
        return list(self.axes)

    def get_rank_repr(self, rank: int, omit_axes: tuple[str, ...] = ("data", "pipe"), inner_sep: str = "_",
                      outer_sep: str = "-") -> str:
        """E.g. ``"model_01"``: the rank's coordinates on the axes not omitted (checkpoint file naming)."""
        coord = self.get_coord(rank)
        return outer_sep.join(f"{a}{inner_sep}{getattr(coord, a):02d}" for a in self.axes if a not in omit_axes)

    def get_dim(self, axis: str) -> int:
        """Size of ``axis`` (0 if the topology has no such axis, as DeepSpeed)."""
        return self.dims[self.axes.index(axis)] if axis in self.axes else 0

    def get_coord(self, rank: int) -> Any:
        """The ``ProcessCoord`` of ``rank``."""
        if not 0 <= rank < self.world_size():
            raise ValueError(f"rank {rank} is not in a topology of {self.world_size()} ranks")
        coord = []
        for d in reversed(self.dims):
            coord.append(rank % d)
            rank //= d
        return self.ProcessCoord(*reversed(coord))

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """Every group of ranks that differ only along ``axis`` ([] if there is no such axis)."""
        if axis not in self.axes:
            return []
        others = [a for a in self.axes if a != axis]
        lists = []
        for fixed in itertools.product(*(range(self.get_dim(a)) for a in others)):
            base = dict(zip(others, fixed))
            lists.append([self.get_rank(**base, **{axis: i}) for i in range(self.get_dim(axis))])
        return lists

    def filter_match(self, **filter_kwargs: int) -> list[int]:
        """Ranks whose coordinates match every given axis value."""
        return [r for c, r in self.mapping.items() if all(getattr(c, k) == v for k, v in filter_kwargs.items())]

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        """Ranks whose coordinate on ``axis`` is ``idx``."""
        return self.filter_match(**{axis: idx})

    def world_size(self) -> int:
        """Number of ranks."""
        n = 1
        for d in self.dims:
            n *= d
        return n

    def __str__(self) -> str:
        return str(self.mapping)


class PipeDataParallelTopology(ProcessTopology):
    """Pipeline x data parallelism; data-parallel peers are adjacent ranks."""

    def __init__(self, num_pp: int, num_dp: int) -> None:
        super().__init__(axes=["pipe", "data"], dims=[num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """Pipeline x data x tensor (model) parallelism; tensor-parallel peers are adjacent ranks."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int) -> None:
        super().__init__(axes=["pipe", "data", "model"], dims=[num_pp, num_dp, num_mp])


def to_degrees(topology: Any) -> dict[str, int]:
    """``{"pp", "dp", "tp"}`` degrees of a DeepSpeed-style topology, checking its axes fit shardwise's rank order.

    shardwise lays ranks out pipe (outermost) > data > model (innermost); a topology whose axes (those larger than
    one) come in another order would put different ranks in each group than the user expects, so it is refused.
    """
    axes = list(topology.get_axis_names())
    unknown = [a for a in axes if a not in AXIS_NAMES]
    if unknown:
        raise ValueError(f"topology axes {unknown} are not pipeline axes; use 'pipe', 'data' and 'model'")
    nontrivial = [a for a in axes if topology.get_dim(a) > 1]
    if nontrivial != [a for a in _ORDER if a in nontrivial]:
        raise ValueError(
            f"topology axes {axes} order ranks differently from shardwise's pipe > data > model layout; build it "
            "with PipeModelDataParallelTopology(num_pp, num_mp, num_dp) or PipeDataParallelTopology(num_pp, num_dp)"
        )
    return {AXIS_NAMES[a]: max(1, topology.get_dim(a)) for a in _ORDER if a in axes} | {
        AXIS_NAMES[a]: 1 for a in _ORDER if a not in axes
    }
