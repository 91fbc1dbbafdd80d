"""Every collective shardwise issues, as thin wrappers over torch.distributed.

Each wrapper (1) returns at once for a group of one rank, (2) records bytes and time in the comms log, and
(3) turns a backend failure or timeout into a ``CollectiveError`` naming the operation, the group and this rank,
instead of a bare gloo/nccl message; after a timeout, also the ranks that did not arrive (``arrivals.py``). On
gloo, all-gather and reduce-scatter run as one round of direct messages (``direct.py``), which is faster on the
CPU than gloo's ring. Asynchronous calls return a ``Handle`` whose ``wait()`` does (2) and (3).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from shardwise.comm import arrivals, direct
from shardwise.comm.comms_log import COMMS_LOG
from shardwise.comm.group import Group, as_group
from shardwise.comm.shards import ceil_div

ReduceOp = dist.ReduceOp
_POINT_TO_POINT = ("send", "recv")

# torch 2.13 renamed the tensor-in/tensor-out collectives; keep working on older releases.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the operation, group and rank."""


def _explain(op: str, group: Group, exc: BaseException, number: int = 0) -> CollectiveError:
    rank = dist.get_rank() if dist.is_initialized() else 0
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
    missing = arrivals.report(group, op, number) if timed_out and number else ""
    hint = (
        "another rank did not reach the same collective in time: check that every rank issues the same collectives "
        "in the same order (a rank that raised, skipped a step, or has different data/model shapes), or raise the "
        "timeout (comms_config.timeout in the config, SHARDWISE_COMM_TIMEOUT, or init_distributed(timeout=...))"
        if timed_out
        else "a peer rank probably failed first; look for its traceback"
    )
    kind = "timed out" if timed_out else "failed"
    call = f"{op} #{number}" if number else op
    found = f" {missing[0].upper()}{missing[1:]}." if missing else ""
    return CollectiveError(f"rank {rank}: {call} on group {group!r} {kind}: {text}.{found} Hint: {hint}")


class Handle:
    """Result of an asynchronous collective: ``wait()`` blocks, records time, and explains failures."""

    __slots__ = ("_work", "_op", "_group", "_start", "_done", "_number")

    def __init__(self, work: Any, op: str, group: Group, start: float, number: int = 0) -> None:
        self._work, self._op, self._group, self._start, self._done = work, op, group, start, False
        self._number = number

    def wait(self) -> None:
        """Block until the collective has completed on this rank."""
        if self._done:
            return
        self._done = True
        if self._work is None:
            return
        try:
            self._work.wait()
        except Exception as exc:  # backend errors come as RuntimeError / DistBackendError
            raise _explain(self._op, self._group, exc, self._number) from exc
        COMMS_LOG.add_time(self._op, self._group.name, time.perf_counter() - self._start)

    def is_completed(self) -> bool:
        """Whether the collective has finished (non-blocking)."""
        return self._done or self._work is None or self._work.is_completed()


_DONE = Handle(None, "noop", Group("noop", (0,)), 0.0)


def _run(op: str, group: Group, nbytes: int, async_op: bool, call: Any) -> Handle | None:
    number = 0 if op in _POINT_TO_POINT else arrivals.next_number(group)
    start = time.perf_counter()
    try:
        work = call()
    except Exception as exc:
        raise _explain(op, group, exc, number) from exc
    if async_op:
        COMMS_LOG.record(op, group.name, group.size, nbytes)
        return Handle(work, op, group, start, number)
    COMMS_LOG.record(op, group.name, group.size, nbytes, time.perf_counter() - start)
    return None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(tensor: torch.Tensor, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False):
    """In-place all-reduce of ``tensor`` over ``group``."""
    g = as_group(group)
    if g.size == 1:
        return _DONE if async_op else None
    return _run("all_reduce", g, _nbytes(tensor), async_op,
                lambda: dist.all_reduce(tensor, op=op, group=g.torch_group, async_op=async_op))


def all_gather_padded(piece: torch.Tensor, numel: int, group: Any = None) -> torch.Tensor:
    """The inverse of ``shards.padded_shard``: every rank's piece of a ``numel``-element tensor, concatenated and cut
    back to ``numel`` (a piece shorter than ``ceil(numel / size)`` is zero-padded first)."""
    g = as_group(group)
    per = ceil_div(numel, g.size)
    if piece.numel() != per:
        padded = piece.new_zeros(per)
        padded[: piece.numel()] = piece.reshape(-1)
        piece = padded
    full = piece.new_empty(per * g.size)
    all_gather_into_tensor(full, piece, group=g)
    return full[:numel]


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group: Any = None, async_op: bool = False):
    """Concatenate every rank's ``input`` (equal sizes) into ``output`` along dim 0, in group-rank order."""
    g = as_group(group)
    if g.size == 1:
        if output.data_ptr() != input.data_ptr():
            output.copy_(input.view_as(output))
        return _DONE if async_op else None
    if direct.applies(g, output, input):
        return _run("all_gather", g, _nbytes(output), async_op,
                    lambda: direct.all_gather_into_tensor(output, input, g, async_op))
    return _run("all_gather", g, _nbytes(output), async_op,
                lambda: _all_gather_single(output, input, group=g.torch_group, async_op=async_op))


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, op: Any = ReduceOp.SUM, group: Any = None,
                          async_op: bool = False):
    """Reduce ``input`` over the group and leave chunk ``group.rank`` of the result in ``output``."""
    g = as_group(group)
    if g.size == 1:
        if output.data_ptr() != input.data_ptr():
            output.copy_(input.view_as(output))
        return _DONE if async_op else None
    if op == ReduceOp.SUM and output.dtype == input.dtype and direct.applies(g, output, input):
        return _run("reduce_scatter", g, _nbytes(input), async_op,
                    lambda: direct.reduce_scatter_tensor(output, input, g, async_op))
    return _run("reduce_scatter", g, _nbytes(input), async_op,
                lambda: _reduce_scatter_single(output, input, op=op, group=g.torch_group, async_op=async_op))


def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None, async_op: bool = False):
    """Gather ``tensor`` from every rank into ``tensor_list`` (sizes may differ per rank only on some backends)."""
    g = as_group(group)
    if g.size == 1:
        tensor_list[0].copy_(tensor)
        return _DONE if async_op else None
    return _run("all_gather", g, _nbytes(tensor) * g.size, async_op,
                lambda: dist.all_gather(tensor_list, tensor, group=g.torch_group, async_op=async_op))


def broadcast(tensor: torch.Tensor, src: int, group: Any = None, async_op: bool = False):
    """Copy ``tensor`` from global rank ``src`` to every member of ``group``."""
    g = as_group(group)
    if g.size == 1:
        return _DONE if async_op else None
    return _run("broadcast", g, _nbytes(tensor), async_op,
                lambda: dist.broadcast(tensor, src=src, group=g.torch_group, async_op=async_op))


def reduce(tensor: torch.Tensor, dst: int, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False):
    """Reduce ``tensor`` onto global rank ``dst``."""
    g = as_group(group)
    if g.size == 1:
        return _DONE if async_op else None
    return _run("reduce", g, _nbytes(tensor), async_op,
                lambda: dist.reduce(tensor, dst=dst, op=op, group=g.torch_group, async_op=async_op))


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int] | None = None,
                      input_split_sizes: list[int] | None = None, group: Any = None, async_op: bool = False):
    """Scatter chunks of ``input`` to every rank and gather theirs into ``output``."""
    g = as_group(group)
    if g.size == 1:
        output.copy_(input)
        return _DONE if async_op else None
    return _run("all_to_all", g, _nbytes(input), async_op,
                lambda: dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes,
                                               group=g.torch_group, async_op=async_op))


def send(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0) -> None:
    """Blocking point-to-point send to global rank ``dst``."""
    g = as_group(group)
    _run("send", g, _nbytes(tensor), False, lambda: dist.send(tensor, dst, group=g.torch_group, tag=tag))


def recv(tensor: torch.Tensor, src: int, group: Any = None, tag: int = 0) -> None:
    """Blocking point-to-point receive from global rank ``src``."""
    g = as_group(group)
    _run("recv", g, _nbytes(tensor), False, lambda: dist.recv(tensor, src, group=g.torch_group, tag=tag))


def isend(tensor: torch.Tensor, dst: int, group: Any = None, tag: int = 0) -> Handle:
    """Non-blocking send; ``wait()`` the handle before reusing ``tensor``."""
    g = as_group(group)
    return _run("send", g, _nbytes(tensor), True, lambda: dist.isend(tensor, dst, group=g.torch_group, tag=tag))


def irecv(tensor: torch.Tensor, src: int, group: Any = None, tag: int = 0) -> Handle:
    """Non-blocking receive; ``wait()`` the handle before reading ``tensor``."""
    g = as_group(group)
    return _run("recv", g, _nbytes(tensor), True, lambda: dist.irecv(tensor, src, group=g.torch_group, tag=tag))


def barrier(group: Any = None) -> None:
    """Block until every member of ``group`` arrives."""
    g = as_group(group)
    if g.size == 1:
        return
    _run("barrier", g, 0, False, lambda: dist.barrier(group=g.torch_group))


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Gather one small picklable object per rank (only our own ranks' metadata; never untrusted data)."""
    g = as_group(group)
    if g.size == 1:
        return [obj]
    out: list[Any] = [None] * g.size
    _run("all_gather_object", g, 0, False, lambda: dist.all_gather_object(out, obj, group=g.torch_group))
    return out


def broadcast_object(obj: Any, src: int, group: Any = None) -> Any:
    """Send one small picklable object from global rank ``src`` to the group; returns it on every rank."""
    g = as_group(group)
    if g.size == 1:
        return obj
    box = [obj]
    _run("broadcast_object", g, 0, False, lambda: dist.broadcast_object_list(box, src=src, group=g.torch_group))
    return box[0]
