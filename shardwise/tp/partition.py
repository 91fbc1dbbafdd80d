"""Pure math of tensor-parallel splits: which slice of a weight dimension each rank owns (no torch.distributed).

A dimension of a full weight (a Linear's output features, an Embedding's vocabulary, ...) is divided over the
ranks of the tensor-parallel group. Three things make this more than ``total // world``:

* **grain**: splits fall on multiples of ``grain`` elements, so attention heads are never cut (grain = head_dim),
  as DeepSpeed inference's ``tp_grain_size`` does. When the grains do not divide evenly, the first ranks own one
  grain more (sizes differ by at most one grain).
* **fused parts**: one Linear may hold several logical matrices stacked along the split dimension (Q, K and V in
  one projection; gate and up in SwiGLU). Each part is split separately and a rank owns its chunk of every part,
  concatenated in part order: rank r holds ``[q_r, k_r, v_r]``, so its local projection is exactly the
  projection of its own heads.
* the **gather order**: concatenating every rank's local slice (what an all-gather produces) gives
  ``[q_0 k_0 v_0 q_1 k_1 v_1 ...]``; ``gather_permutation`` maps that back to the full layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class SplitError(ValueError):
    """A dimension cannot be split as requested; the message says how to fix it."""


def partition_sizes(total: int, world: int, grain: int = 1) -> list[int]:
    """Sizes of ``world`` contiguous chunks of ``total`` elements, each a multiple of ``grain``, as even as possible.

    >>> partition_sizes(10, 4)
    [3, 3, 2, 2]
    >>> partition_sizes(6 * 64, 4, grain=64)   # 6 heads of 64 over 4 ranks
    [128, 128, 64, 64]
    """
    if world < 1 or grain < 1:
        raise SplitError(f"world ({world}) and grain ({grain}) must be >= 1")
    if total % grain:
        raise SplitError(f"a dimension of {total} elements cannot be split in grains of {grain}: {total} % {grain} = "
                         f"{total % grain}; use a grain that divides it (e.g. the head size for attention weights)")
    grains = total // grain
    base, extra = divmod(grains, world)
    return [(base + (1 if r < extra else 0)) * grain for r in range(world)]


@dataclass(frozen=True)
class DimSplit:
    """How one weight dimension (made of fused ``parts``) is divided over ``world`` tensor-parallel ranks."""

    parts: tuple[int, ...]
    world: int
    grain: int = 1

    @classmethod
    def of(cls, total: int, world: int, grain: int = 1, parts: Sequence[int] | None = None) -> DimSplit:
        """A split of ``total`` elements; ``parts`` (summing to ``total``) are the fused sub-blocks, if any."""
        parts_t = tuple(int(p) for p in parts) if parts else (int(total),)
        if sum(parts_t) != total:
            raise SplitError(f"fused parts {list(parts_t)} sum to {sum(parts_t)}, but the dimension has {total} "
                             "elements; pass parts that add up to the full size")
        split = cls(parts_t, int(world), int(grain))
        for p in parts_t:
            if 0 in partition_sizes(p, split.world, split.grain):
                raise SplitError(f"a block of {p} elements has {p // split.grain} grains of {split.grain}, fewer than "
                                 f"the {split.world} ranks, so some rank would own none of it (e.g. fewer key/value "
                                 "heads than tensor ranks); lower the tensor-parallel degree or replicate that block")
        return split

    @property
    def total(self) -> int:
        """Size of the full dimension."""
        return sum(self.parts)

    def part_sizes(self, rank: int) -> list[int]:
        """How many elements of each fused part ``rank`` owns (its local layout, in part order)."""
        return [partition_sizes(p, self.world, self.grain)[rank] for p in self.parts]

    def local_size(self, rank: int) -> int:
        """Elements of the dimension held by ``rank``."""
        return sum(self.part_sizes(rank))

    def sizes(self) -> list[int]:
        """Local size of every rank."""
        return [self.local_size(r) for r in range(self.world)]

    def is_even(self) -> bool:
        """Whether every rank holds the same number of elements."""
        return len(set(self.sizes())) == 1

    def ranges(self, rank: int) -> list[tuple[int, int]]:
        """Half-open index ranges of the full dimension owned by ``rank``, in local order."""
        out, base = [], 0
        for p in self.parts:
            sizes = partition_sizes(p, self.world, self.grain)
            start = base + sum(sizes[:rank])
            out.append((start, start + sizes[rank]))
            base += p
        return out

    def start(self, rank: int) -> int:
        """First full-dimension index owned by ``rank`` (meaningful for a single part)."""
        return self.ranges(rank)[0][0]

    def gather_permutation(self) -> list[int] | None:
        """Indices that reorder a rank-order concatenation of local slices into the full layout (None: identity)."""
        if len(self.parts) == 1:
            return None
        positions = [0] * self.total
        offset = 0
        for r in range(self.world):
            for lo, hi in self.ranges(r):
                for full_index in range(lo, hi):
                    positions[full_index] = offset
                    offset += 1
        return positions
