"""Direct-exchange all-gather and reduce-scatter for gloo: each rank posts every peer's chunk at once.

gloo's ``all_gather`` and ``reduce_scatter`` walk a ring step by step through staging copies. On the CPU, with the
small groups a CPU job runs, posting all ``n - 1`` chunks as point-to-point messages in one round moves the same
bytes per rank (``(n-1)/n`` of the buffer) up to 3x faster (measured on this project's 2-core machine by
``benchmarks/bench_collectives.py``: 13 MB on 2 ranks, reduce-scatter 15.1 -> 5.3 ms and all-gather 8.5 -> 5.0 ms;
2-3x on 4 ranks; about equal below 1 MB on 2 ranks). ZeRO's reduce-scatter during backward and its parameter
all-gathers are exactly these two collectives, so this is where stages 1-3 on the CPU gain most. gloo's
all-reduce, by contrast, is already fast and stays as it is.

``collectives.py`` routes a SUM reduce-scatter or an all-gather here when the group runs on gloo, has at most
``MAX_RANKS`` members and the tensors are contiguous CPU tensors; ``SHARDWISE_GLOO_DIRECT=0`` turns it off.

[Note: direct-exchange tags]
Point-to-point messages are matched by (peer, tag). Each call takes the next tag from a counter kept per process
group; every rank issues a group's collectives in the same order (which any collective already requires), so both
ends of every message draw the same tag, and collectives in flight at the same time never match each other's
messages. Tags start at ``_TAG_BASE``, far above the small tags the pipeline uses for its own messages.

Timeouts come from gloo itself: a receive that does not complete within the process group's timeout raises, and the
wrapper in ``collectives.py`` turns that into a ``CollectiveError`` naming the collective, as for any other one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from shardwise.comm.group import Group

MAX_RANKS = 16  # beyond this, n - 1 messages per rank and call stop paying off against the ring
_TAG_BASE = 1 << 24
_TAG_SPAN = 1 << 20
_next_tag: dict[tuple[int, tuple[int, ...]], int] = {}
_backend: dict[tuple[int, tuple[int, ...]], str] = {}


def _key(group: Group) -> tuple[int, tuple[int, ...]]:
    return id(group.torch_group), group.ranks


def applies(group: Group, *tensors: torch.Tensor) -> bool:
    """Whether a collective over ``group`` on ``tensors`` takes the direct-exchange path."""
    if not 2 <= group.size <= MAX_RANKS or os.environ.get("SHARDWISE_GLOO_DIRECT", "1") == "0":
        return False
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return False
    key = _key(group)
    backend = _backend.get(key)
    if backend is None:
        backend = _backend[key] = str(dist.get_backend(group.torch_group)).lower()
    return backend == "gloo"


def _tag(group: Group) -> int:
    key = _key(group)
    n = _next_tag.get(key, 0)
    _next_tag[key] = (n + 1) % _TAG_SPAN
    return _TAG_BASE + n


class DirectWork:
    """A torch ``Work`` look-alike over several messages; ``wait()`` also runs the completion (the local sum)."""

    def __init__(self, works: list[Any], finish: Callable[[], None] | None = None) -> None:
        self._works = works
        self._finish = finish

    def wait(self, timeout: Any = None) -> bool:
        """Block until every message of the collective has completed, then finish it."""
        for w in self._works:
            w.wait()
        self._works = []
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        return True

    def is_completed(self) -> bool:
        """Whether ``wait()`` has run (the result is only in place after it)."""
        return not self._works and self._finish is None


def _peers(group: Group) -> list[int]:
    """Group ranks other than this one, starting after it (so that no rank is every rank's first peer)."""
    me, n = group.rank, group.size
    return [(me + k) % n for k in range(1, n)]


def _exchange(group: Group, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor]) -> list[Any]:
    tag = _tag(group)
    pg = group.torch_group
    peers = [(peer, group.global_rank(peer)) for peer in _peers(group)]
    # every receive is posted before any send, so no message arrives before its destination is known
    works = [dist.irecv(recvs[peer], rank, group=pg, tag=tag) for peer, rank in peers]
    works += [dist.isend(sends[peer], rank, group=pg, tag=tag) for peer, rank in peers]
    return works


def _chunk_views(op: str, full: torch.Tensor, chunk: int, group: Group) -> list[torch.Tensor]:
    """``full`` (any shape, contiguous) as ``group.size`` consecutive chunks of ``chunk`` elements."""
    flat = full.view(-1)
    if flat.numel() != chunk * group.size:
        raise ValueError(f"{op}: the full buffer has {flat.numel()} elements, expected {group.size} x {chunk}")
    return [flat[p * chunk : (p + 1) * chunk] for p in range(group.size)]


def _complete(work: DirectWork, async_op: bool) -> DirectWork | None:
    if async_op:
        return work
    work.wait()
    return None


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group: Group,
                           async_op: bool) -> DirectWork | None:
    """``output`` (n equal chunks, dim 0) <- every rank's ``input``, in group-rank order."""
    chunks = _chunk_views("all_gather", output, input.numel(), group)
    mine = chunks[group.rank]
    if mine.data_ptr() != input.data_ptr():
        mine.copy_(input.reshape(-1))
    sends = dict.fromkeys(range(group.size), mine)
    return _complete(DirectWork(_exchange(group, sends, dict(enumerate(chunks)))), async_op)


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, group: Group,
                          async_op: bool) -> DirectWork | None:
    """``output`` <- the sum over ranks of chunk ``group.rank`` of ``input``."""
    chunk = output.numel()
    chunks = _chunk_views("reduce_scatter", input, chunk, group)
    peers = _peers(group)
    received = torch.empty((len(peers), chunk), dtype=input.dtype, device=input.device)
    sends = {p: chunks[p] for p in peers}
    recvs = {p: received[k] for k, p in enumerate(peers)}
    own = chunks[group.rank]

    def finish() -> None:
        out = output.view(-1)
        torch.add(own, received[0], out=out)  # a fixed order: the result does not depend on arrival times
        for k in range(1, len(peers)):
            out.add_(received[k])

    return _complete(DirectWork(_exchange(group, sends, recvs), finish), async_op)
