"""Pure math for ZeRO stages 0-2: where each parameter lives in a flat buffer, how the buffer splits into
communication buckets, and which slice of each bucket every rank owns. No torch, no torch.distributed.

[Note: bucket-interleaved partitions]
The flat buffer is a sequence of buckets. Every bucket holds whole parameters, is padded to a multiple of
``world * align`` elements, and is split evenly across ranks: rank r owns elements
``[start + r*s, start + (r+1)*s)`` of every bucket (``s = size / world``). A rank's *partition* is the concatenation of
its slices of every bucket, in bucket order. This makes every gradient bucket one ``reduce_scatter`` straight into the
owner's partition and every parameter bucket one ``all_gather`` straight into the flat buffer: no per-parameter
collectives, no copies, and buckets can be launched as soon as backward has produced them (overlap). Per rank the
partition is ``total / world`` elements, so optimizer state and master weights are exactly 1/world of the model,
plus at most ``world * align`` padding elements per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.comm.shards import round_up


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's place in the flat buffer."""

    index: int  # position in the group's parameter list
    offset: int  # first element in the flat buffer
    numel: int
    bucket: int


@dataclass(frozen=True)
class Bucket:
    """A contiguous, padded range of the flat buffer reduced/gathered by one collective."""

    index: int
    start: int
    size: int  # padded; a multiple of world * align
    params: tuple[int, ...]  # indices of the parameters inside it
    world: int

    @property
    def shard_size(self) -> int:
        """Elements each rank owns in this bucket."""
        return self.size // self.world

    def shard_range(self, rank: int) -> tuple[int, int]:
        """Flat-buffer range of ``rank``'s slice of this bucket."""
        lo = self.start + rank * self.shard_size
        return lo, lo + self.shard_size


@dataclass(frozen=True)
class FlatLayout:
    """Placement of a list of parameters in a flat buffer partitioned over ``world`` ranks."""

    slots: tuple[ParamSlot, ...]
    buckets: tuple[Bucket, ...]
    total: int  # flat buffer size, padding included
    world: int

    @property
    def partition_numel(self) -> int:
        """Elements in each rank's partition."""
        return self.total // self.world

    @property
    def used_numel(self) -> int:
        """Elements that belong to parameters (padding excluded)."""
        return sum(s.numel for s in self.slots)

    def bucket_partition_offset(self, bucket: int) -> int:
        """Where a bucket's slice starts inside a rank's partition (the same for every rank)."""
        return self.buckets[bucket].start // self.world

    def owned_pieces(self, param: int, rank: int) -> list[tuple[int, int, int]]:
        """Pieces of parameter ``param`` owned by ``rank``: ``(elem_start, elem_end, partition_offset)``.

        ``elem_*`` index the flattened parameter; ``partition_offset`` is where the piece sits in the rank's
        partition. A parameter lies in one bucket, so it has at most one piece per rank.
        """
        slot = self.slots[param]
        bucket = self.buckets[slot.bucket]
        lo, hi = bucket.shard_range(rank)
        start, end = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
        if start >= end:
            return []
        part = self.bucket_partition_offset(bucket.index) + (start - lo)
        return [(start - slot.offset, end - slot.offset, part)]

    def owner_of(self, param: int, element: int) -> int:
        """Rank owning element ``element`` of parameter ``param``."""
        slot = self.slots[param]
        bucket = self.buckets[slot.bucket]
        return (slot.offset + element - bucket.start) // bucket.shard_size


def build_layout(numels: list[int], bucket_numel: int, world: int, align: int = 16) -> FlatLayout:
    """Lay parameters out in order, closing a bucket once it reaches ``bucket_numel`` elements.

    A parameter larger than ``bucket_numel`` gets a bucket of its own. Each bucket is padded to a multiple of
    ``world * align`` (``align`` elements keep every shard vector-aligned).
    """
    if world < 1 or bucket_numel < 1 or align < 1:
        raise ValueError(f"world ({world}), bucket_numel ({bucket_numel}) and align ({align}) must be >= 1")
    slots: list[ParamSlot] = []
    buckets: list[Bucket] = []
    current: list[int] = []
    start = offset = 0

    def close() -> None:
        nonlocal start, offset, current
        size = round_up(max(offset - start, 1), world * align)
        buckets.append(Bucket(len(buckets), start, size, tuple(current), world))
        start = offset = start + size
        current = []

    for i, n in enumerate(numels):
        if current and offset - start + n > bucket_numel:
            close()
        slots.append(ParamSlot(i, offset, n, len(buckets)))
        current.append(i)
        offset += n
    if current or not buckets:
        close()
    return FlatLayout(tuple(slots), tuple(buckets), start, world)
