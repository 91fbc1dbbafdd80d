"""Shard arithmetic: how a flat tensor of ``numel`` elements splits over ``world`` ranks (ceil-split, the last
pieces zero-padded). One owner for ZeRO's layout, ``zero.Init``, pipeline p2p and partitioned activations.

Rank ``r`` owns elements ``[r * per, (r + 1) * per)`` of the tensor padded to ``per * world`` elements, with
``per = ceil(numel / world)``; ``comm.all_gather_padded`` is the inverse of ``padded_shard``. Pure: no collectives.
"""

from __future__ import annotations

import torch


def ceil_div(n: int, parts: int) -> int:
    """``ceil(n / parts)`` for non-negative ``n`` and positive ``parts``."""
    return -(-n // parts)


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return ceil_div(n, multiple) * multiple


def shard_bounds(numel: int, world: int, rank: int) -> tuple[int, int, int]:
    """``(lo, hi, per)``: rank ``rank`` holds real elements ``[lo, hi)`` of a ``per``-element piece."""
    per = ceil_div(numel, world)
    lo = min(numel, rank * per)
    return lo, min(numel, lo + per), per


def padded_shard(flat: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``ceil(numel / world)`` elements of the 1-D ``flat``, zero-padded at the end (a view of
    ``flat`` when nothing needs padding, else of a padded copy)."""
    per = ceil_div(flat.numel(), world)
    if flat.numel() != per * world:
        padded = flat.new_zeros(per * world)
        padded[: flat.numel()] = flat
        flat = padded
    return flat.narrow(0, rank * per, per)
