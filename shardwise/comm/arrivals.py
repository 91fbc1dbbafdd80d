"""Which ranks did not arrive: what a rank finds out, through the rendezvous store, when a collective times out.

A timeout from the backend only says that *this* rank waited too long. To name the rank(s) it waited for, every
rank numbers the collectives it issues on each group (a local counter, nothing sent: the ranks of a group issue
its collectives in the same order, so the n-th call is the same collective on every rank). When a collective
times out, the rank appends ``rank:number:op`` to one key per group in the store the process group was created
with, and reads the key back for a short grace period. The peers that reached the same collective time out too
and append the same number; a rank stuck in *another* collective of the group appends another number (the
ranks issued different sequences); a rank that is computing, hung outside collectives, or stopped appends
nothing. ``describe`` turns that into one sentence for the ``CollectiveError``.

Cost: one integer increment per collective; the store is only used after a timeout. Where the backend cannot
tell (NCCL aborts the process on a timeout through its watchdog instead of raising), only the operation and the
group are named. Point-to-point messages are not numbered (the peer is already known).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence

import torch.distributed as dist

from shardwise.comm.group import Group
from shardwise.comm.timeouts import group_timeout_seconds

__all__ = ["describe", "grace_seconds", "next_number", "report"]

_POLL_S = 0.2
_numbers: dict[tuple[str, tuple[int, ...], str], int] = {}


def _identity(group: Group) -> tuple[str, tuple[int, ...], str]:
    """The same on every member: our name, the ranks, and torch's own name of the group (two groups may share
    ours)."""
    torch_group = group.torch_group
    return group.name, group.ranks, str(getattr(torch_group, "group_name", "")) if torch_group is not None else ""


def next_number(group: Group) -> int:
    """The number of the collective this rank is issuing on ``group`` (1, 2, ...)."""
    key = _identity(group)
    n = _numbers.get(key, 0) + 1
    _numbers[key] = n
    return n


def grace_seconds(timeout_s: float) -> float:
    """How long a timed-out rank waits for its peers' reports: 5% of the timeout, between 2 and 30 s (peers that
    reached the same collective later time out that much later)."""
    return min(30.0, max(2.0, 0.05 * timeout_s))


def _store_key(group: Group) -> str:
    name, ranks, torch_name = _identity(group)
    members = hashlib.sha1(f"{','.join(map(str, ranks))}|{torch_name}".encode()).hexdigest()[:12]
    return f"shardwise/arrivals/{name}/{members}"


def _parse(text: bytes) -> dict[int, tuple[int, str]]:
    """``b"0:12:all_reduce;1:11:barrier;"`` -> ``{0: (12, "all_reduce"), 1: (11, "barrier")}`` (last one wins)."""
    positions: dict[int, tuple[int, str]] = {}
    for entry in text.decode("utf-8", "replace").split(";"):
        rank, _, rest = entry.partition(":")
        number, _, op = rest.partition(":")
        if rank.isdigit() and number.isdigit():
            positions[int(rank)] = (int(number), op)
    return positions


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def describe(members: Sequence[int], number: int, op: str, positions: Mapping[int, tuple[int, str]],
             waited_s: float) -> str:
    """One sentence: which members of the group did not arrive at collective ``number`` (``op``), and where the
    ones that reported are instead."""
    arrived = [r for r in members if positions.get(r, (None,))[0] == number]
    elsewhere = [r for r in members if r in positions and positions[r][0] != number]
    silent = [r for r in members if r not in positions]
    parts = []
    if silent:
        parts.append(f"{_ranks(silent)} did not arrive (no collective of this group timed out there within "
                     f"{waited_s:.0f} s: computing, hung outside collectives, or stopped)")
    for r in elsewhere:
        other, other_op = positions[r]
        parts.append(f"rank {r} waits at {other_op} #{other} of this group instead (the ranks issued this group's "
                     "collectives in different orders)")
    if not parts:
        return f"every rank of the group reached {op} #{number}: the transport itself stalled"
    return "; ".join(parts) + f"; {_ranks(arrived)} reached {op} #{number}"


def report(group: Group, op: str, number: int) -> str:
    """After ``op`` #``number`` on ``group`` timed out here: post this rank's position, gather the peers' for the
    grace period, and :func:`describe` them ("" when the store cannot be used)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        key = _store_key(group)
        store.append(key, f"{dist.get_rank()}:{number}:{op};")
        grace = grace_seconds(group_timeout_seconds(group.torch_group))
        start = time.monotonic()
        while True:
            positions = _parse(store.get(key))
            waited = time.monotonic() - start
            if all(r in positions for r in group.ranks) or waited >= grace:
                return describe(group.ranks, number, op, positions, grace)
            time.sleep(_POLL_S)
    except Exception:  # the store is gone too (its host stopped): say what we can without it
        return ""
