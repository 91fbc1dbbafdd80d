"""Pure coordinate math for the process grid (no torch.distributed): rank <-> coordinates, and axis groups.

Axes run outermost to innermost as ``("pp", "dp", "sp", "tp")``: tensor-parallel ranks are consecutive (they talk
the most, so they share a node), then sequence-parallel, then data-parallel, with pipeline stages outermost; this is
the order Megatron and DeepSpeed's ``PipeModelDataParallelTopology`` use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from math import prod

AXES: tuple[str, ...] = ("pp", "dp", "sp", "tp")


class GridError(ValueError):
    """The requested parallel degrees do not fit the world size."""


def resolve_sizes(world_size: int, pp: int = 1, tp: int = 1, sp: int = 1, dp: int | None = None) -> dict[str, int]:
    """Fill in the data-parallel degree (world / (pp*tp*sp)) and check the product equals the world size."""
    for name, value in (("pp", pp), ("tp", tp), ("sp", sp)):
        if value < 1:
            raise GridError(f"{name} degree must be >= 1, got {value}")
    model = pp * tp * sp
    if dp is None:
        if world_size % model:
            raise GridError(
                f"world size {world_size} is not divisible by pipeline {pp} x tensor {tp} x sequence {sp} = {model}; "
                "choose degrees whose product divides the number of ranks"
            )
        dp = world_size // model
    if dp * model != world_size:
        raise GridError(
            f"pipeline {pp} x data {dp} x sequence {sp} x tensor {tp} = {dp * model} != world size {world_size}"
        )
    return {"pp": pp, "dp": dp, "sp": sp, "tp": tp}


def strides(sizes: dict[str, int]) -> dict[str, int]:
    """Rank distance between neighbours along each axis."""
    out, stride = {}, 1
    for axis in reversed(AXES):
        out[axis] = stride
        stride *= sizes[axis]
    return out


def coords_of(rank: int, sizes: dict[str, int]) -> dict[str, int]:
    """Coordinates of ``rank`` on every axis."""
    st = strides(sizes)
    return {axis: (rank // st[axis]) % sizes[axis] for axis in AXES}


def rank_of(coords: dict[str, int], sizes: dict[str, int]) -> int:
    """Global rank at the given coordinates (missing axes are 0)."""
    st = strides(sizes)
    return sum(coords.get(axis, 0) * st[axis] for axis in AXES)


def axis_groups(axes: Iterable[str], sizes: dict[str, int]) -> list[tuple[int, ...]]:
    """Every group varying along ``axes`` (others fixed), each as sorted global ranks, in a deterministic order."""
    axes = tuple(a for a in AXES if a in set(axes))
    unknown = set(axes) - set(AXES)
    if unknown:
        raise GridError(f"unknown axes {sorted(unknown)}; valid axes are {AXES}")
    world = prod(sizes[a] for a in AXES)
    fixed_axes = [a for a in AXES if a not in axes]
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world):  # one pass: O(world), not O(groups x world) (1,024-rank plans build every family)
        c = coords_of(rank, sizes)
        groups.setdefault(tuple(c[a] for a in fixed_axes), []).append(rank)
    return [tuple(members) for members in groups.values()]


def chunk_groups(groups: Sequence[tuple[int, ...]], size: int) -> list[tuple[int, ...]]:
    """Split every group into consecutive chunks of ``size`` members (hpZ's intra-node secondary groups)."""
    out = []
    for g in groups:
        if len(g) % size:
            raise GridError(f"group of {len(g)} ranks cannot be split into chunks of {size}")
        out.extend(tuple(g[i : i + size]) for i in range(0, len(g), size))
    return out


def strided_groups(groups: Sequence[tuple[int, ...]], size: int) -> list[tuple[int, ...]]:
    """Members with the same position inside each chunk of ``size`` (hpZ's cross-node peer groups).

    For a group ``(0..7)`` and ``size=4``: chunks are ``(0,1,2,3)``, ``(4,5,6,7)``; strided groups ``(0,4)``,
    ``(1,5)``, ``(2,6)``, ``(3,7)``.
    """
    out = []
    for g in groups:
        if len(g) % size:
            raise GridError(f"group of {len(g)} ranks cannot be split into chunks of {size}")
        out.extend(tuple(g[i::size]) for i in range(size))
    return out
