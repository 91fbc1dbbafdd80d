"""Pure math of auto-TP sharding: which index ranges of a full weight dimension each tensor-parallel rank keeps.

A ``ShardLayout`` lists, for every rank, the half-open ranges of one dimension of a full weight that the rank
holds, concatenated in order. Most layouts are plain ``DimSplit``s of ``shardwise.tp.partition`` (contiguous
chunks falling on whole heads, optionally per fused part), and the layers of ``shardwise.tp`` hold them directly.
Two attention layouts are not splits but *partial replication*, and only inference needs them:

* multi-query attention (Falcon): the query heads are split, the single key head and value head are kept whole
  on every rank (``split_with_replicated``);
* grouped-query attention with more ranks than key/value heads (LLaMA with 2 KV heads on 4 ranks): each rank
  keeps the one KV head its query heads attend to (``kv_heads``), so ranks ``2k`` and ``2k+1`` share KV head k.

No torch.distributed here: everything is integers, so the unit tests check layouts without ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shardwise.tp.partition import DimSplit

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ShardLayout:
    """The ranges of a dimension of ``total`` elements kept by each of ``len(per_rank)`` ranks."""

    total: int
    per_rank: tuple[Ranges, ...]
    #: the same layout as a ``DimSplit`` when it is one (then ``shardwise.tp`` layers can hold it), else None
    split: DimSplit | None = None

    @property
    def world(self) -> int:
        """Number of ranks the layout is defined for."""
        return len(self.per_rank)

    def ranges(self, rank: int) -> Ranges:
        """Ranges of the full dimension kept by ``rank``, in local order."""
        return self.per_rank[rank]

    def local_size(self, rank: int) -> int:
        """Elements of the dimension held by ``rank``."""
        return sum(hi - lo for lo, hi in self.per_rank[rank])

    def is_replicated(self) -> bool:
        """Whether every rank holds the whole dimension."""
        return all(r == ((0, self.total),) for r in self.per_rank)


def even(total: int, world: int, grain: int = 1, parts: Sequence[int] | None = None) -> ShardLayout:
    """Contiguous chunks on ``grain`` boundaries (per fused part, if ``parts``), as ``DimSplit`` defines them."""
    split = DimSplit.of(total, world, grain, parts)
    return ShardLayout(total, tuple(_merge(split.ranges(r)) for r in range(world)), split)


def replicated(total: int, world: int) -> ShardLayout:
    """Every rank keeps the whole dimension."""
    return ShardLayout(total, tuple(((0, total),) for _ in range(world)))


def split_with_replicated(split_part: int, replicated_parts: Sequence[int], world: int, grain: int) -> ShardLayout:
    """A fused dimension ``[split_part | replicated_parts...]``: the first part split on ``grain``, the rest whole.

    Falcon's multi-query ``query_key_value`` is ``[H query heads | 1 key head | 1 value head]``: rank r keeps its
    query heads followed by the key and value heads, which is exactly the layout its attention module expects
    once its head count is divided.
    """
    first = DimSplit.of(split_part, world, grain)
    tail, start = [], split_part
    for size in replicated_parts:
        tail.append((start, start + size))
        start += size
    per_rank = tuple(_merge(first.ranges(r) + tail) for r in range(world))
    return ShardLayout(start, per_rank)


def kv_heads(num_kv_heads: int, head_dim: int, world: int) -> ShardLayout:
    """Key/value heads of a grouped-query attention over ``world`` ranks.

    ``world`` divides the KV heads: an ordinary head split. ``world`` a multiple of the KV heads: each group of
    ``world / num_kv_heads`` consecutive ranks shares (replicates) one KV head, the one its query heads use.
    """
    if num_kv_heads % world == 0:
        return even(num_kv_heads * head_dim, world, head_dim)
    if world % num_kv_heads:
        raise ValueError(f"{num_kv_heads} key/value heads fit neither a split nor a replication over {world} ranks")
    share = world // num_kv_heads
    per_rank = tuple((((r // share) * head_dim, (r // share + 1) * head_dim),) for r in range(world))
    return ShardLayout(num_kv_heads * head_dim, per_rank)


def local_kv_heads(num_kv_heads: int, world: int) -> int:
    """KV heads held per rank by ``kv_heads``: a share of them, or one (replicated) when ranks outnumber them."""
    return num_kv_heads // world if num_kv_heads % world == 0 else 1


def _merge(ranges: Sequence[tuple[int, int]]) -> Ranges:
    """Join touching ranges ((0, 4), (4, 8) -> (0, 8)) so that a read is one slice where it can be."""
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if hi <= lo:
            continue
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


# -- which tensor-parallel degrees a model admits ----------------------------------------------------------------
def divisors(n: int) -> list[int]:
    """Positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_degrees(num_heads: int, num_kv_heads: int, kv_mode: str) -> list[int]:
    """Tensor-parallel degrees that keep attention heads whole.

    ``kv_mode``: ``"same"`` (KV heads = query heads, or fused per head), ``"gqa"`` (separate K/V projections:
    KV heads split or replicated), ``"grouped"`` (fused per KV group, Falcon's new architecture: the degree must
    divide the KV heads), ``"mqa"`` (one KV head, replicated).
    """
    degrees = divisors(num_heads)
    if kv_mode == "gqa":
        return [d for d in degrees if num_kv_heads % d == 0 or d % num_kv_heads == 0]
    if kv_mode == "grouped":
        return [d for d in degrees if num_kv_heads % d == 0]
    return degrees
