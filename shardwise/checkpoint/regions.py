"""Pure index math for resharding: which part of a saved piece a rank needs. No torch, no I/O.

[Note: pieces]
A saved *piece* is a contiguous range ``[start, end)`` of the row-major flattening of a *box* of the full tensor.
The box is a per-dimension slice ``((lo0, hi0), (lo1, hi1), ...)``: the whole tensor for data-parallel (ZeRO)
partitions, which split the flattened parameter; a tensor-parallel slice (e.g. ``dim 0, rows 64..128``) when a
tensor-parallel rank holds only part of the tensor. ZeRO inside tensor parallelism is then a flat range of a box.
A reader asks for the same kind of thing in its *current* layout: a flat range of a box. When the boxes are equal
(every data-parallel reshard) the answer is a 1-D interval overlap; otherwise the overlap is taken box by box.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Box = tuple[tuple[int, int], ...]


def full_box(shape: Sequence[int]) -> Box:
    """The box covering a whole tensor of ``shape``."""
    return tuple((0, int(n)) for n in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    """Extent of ``box`` along every dimension."""
    return tuple(hi - lo for lo, hi in box)


def box_numel(box: Box) -> int:
    """Number of elements inside ``box``."""
    return math.prod(box_shape(box))


def normalize_box(box: Sequence[Sequence[int]] | None, shape: Sequence[int]) -> Box:
    """``None`` -> the full box; otherwise a tuple-of-tuples box, checked against ``shape``."""
    if box is None:
        return full_box(shape)
    out = tuple((int(lo), int(hi)) for lo, hi in box)
    if len(out) != len(shape) or any(not 0 <= lo <= hi <= n for (lo, hi), n in zip(out, shape)):
        raise ValueError(f"box {out} does not fit a tensor of shape {tuple(shape)}")
    return out


def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    """Intersection of two half-open intervals, or None when empty."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def intersect_boxes(a: Box, b: Box) -> Box | None:
    """Intersection of two boxes, or None when empty."""
    out = []
    for x, y in zip(a, b):
        o = overlap(x, y)
        if o is None:
            return None
        out.append(o)
    return tuple(out)


def split_even(n: int, parts: int, index: int) -> tuple[int, int]:
    """``index``-th of ``parts`` equal slices of ``n`` (the tensor-parallel convention; ``n`` must divide)."""
    if n % parts:
        raise ValueError(f"{n} elements do not split evenly into {parts} parts")
    size = n // parts
    return index * size, (index + 1) * size


@dataclass(frozen=True)
class Run:
    """Elements of a rank's local tensor that form one contiguous range of one of its tensor-parallel boxes.

    ``rows`` rows of ``row_len`` elements: row ``i`` starts at ``start + i * stride`` of the requested local range
    and the rows lie back to back in the box's own flattening, at ``box_range``.
    """

    box: int
    box_range: tuple[int, int]
    start: int
    rows: int
    row_len: int
    stride: int


def local_runs(boxes: Sequence[Box], dim: int, flat: tuple[int, int]) -> list[Run]:
    """Split elements ``flat`` of a local tensor made of ``boxes`` concatenated along ``dim`` into box ranges.

    A tensor-parallel rank of a fused projection (Q|K|V) holds one box per part; their concatenation along the split
    dimension is its local weight. Along dimension 0 every box is one contiguous run; along a later dimension the
    boxes interleave row by row (a row = everything after the leading dimensions), so the whole rows of the range
    give one strided run per box and the partial first and last rows a few short ones: at most 3 per box.
    """
    s, e = flat
    if len(boxes) == 1:
        return [Run(0, (s, e), 0, 1, e - s, e - s)]
    shape = box_shape(boxes[0])
    inner = math.prod(shape[dim + 1 :])
    widths = [box_shape(b)[dim] * inner for b in boxes]
    row = sum(widths)  # one row of the local tensor: every box's slice of it, in box order
    runs: list[Run] = []

    def partial(r: int, lo: int, hi: int) -> None:  # columns [lo, hi) of local row r
        base = 0
        for b, w in enumerate(widths):
            o = overlap((lo, hi), (base, base + w))
            if o is not None:
                runs.append(Run(b, (r * w + o[0] - base, r * w + o[1] - base), r * row + o[0] - s, 1,
                                o[1] - o[0], o[1] - o[0]))
            base += w

    first, last = s // row, (e - 1) // row
    if first == last:
        partial(first, s - first * row, e - first * row)
        return runs
    full_lo = first if s == first * row else first + 1
    full_hi = last + 1 if e == (last + 1) * row else last
    if full_lo > first:
        partial(first, s - first * row, row)
    base = 0
    for b, w in enumerate(widths):
        if full_hi > full_lo:
            runs.append(Run(b, (full_lo * w, full_hi * w), full_lo * row + base - s, full_hi - full_lo, w, row))
        base += w
    if full_hi <= last:
        partial(last, 0, e - last * row)
    return runs
