"""The comms log: bytes and time per collective, per process group.

Every collective issued through ``shardwise.comm`` is recorded here (a dict increment, always on), so tests can
assert communication volume against theory and benchmarks can report bytes per step. ``comms_logger.verbose``
additionally logs each operation as it happens, as DeepSpeed's comms logger does.

Two byte counts are kept per record:
* ``msg_bytes``: the size of the full (unsharded) buffer the operation is about, e.g. the whole gathered tensor for
  an all-gather: "an all-gather of P elements" in ZeRO papers is ``msg_bytes == 4P`` in fp32;
* ``wire_bytes``: what this rank sends on a ring/bus algorithm (nccl-tests' "bus bandwidth" convention):
  all-reduce ``2(n-1)/n * S``, all-gather and reduce-scatter ``(n-1)/n * S``, broadcast ``S``, send ``S``.

Besides the per-(op, group) totals, ``sizes`` keeps one row per (op, group, message size) with its count and total
latency: the rows of DeepSpeed's ``deepspeed.comm.log_summary()`` table (rendered by ``comms_summary.py``). An
asynchronous operation is recorded when issued and its latency added when it is waited on; the wait is matched to
the oldest unwaited operation of the same (op, group), which is exact when handles are waited in issue order (as
every caller here does).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field

logger = logging.getLogger("shardwise.comm")

_WIRE_FACTORS = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0 if n > 1 else 0.0,
    "reduce": lambda n: (n - 1) / n,
    "send": lambda n: 1.0,
    "recv": lambda n: 0.0,
    "barrier": lambda n: 0.0,
}


def wire_bytes(op: str, msg_bytes: int, group_size: int) -> float:
    """Bytes this rank sends for ``op`` on a buffer of ``msg_bytes`` over ``group_size`` ranks (ring algorithms)."""
    if group_size <= 1:
        return 0.0
    return _WIRE_FACTORS.get(op, lambda n: 1.0)(group_size) * msg_bytes


@dataclass
class OpStats:
    """Totals for one (operation, group) pair."""

    count: int = 0
    msg_bytes: int = 0
    wire_bytes: float = 0.0
    seconds: float = 0.0


@dataclass
class SizeStats:
    """One row of the summary table: an (op, group, message size) with its count and latencies."""

    group_size: int = 0
    count: int = 0
    seconds: float = 0.0
    timed: int = 0  # operations whose latency is known (an asynchronous one that was never waited on has none)


#: unwaited asynchronous operations remembered per (op, group), to match later waits to message sizes
_PENDING_LIMIT = 4096


@dataclass
class CommsLog:
    """Per-(op, group) totals and per-(op, group, message size) rows since the last ``reset()``."""

    verbose: bool = False
    prof_ops: tuple[str, ...] = ()
    stats: dict[tuple[str, str], OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    sizes: dict[tuple[str, str, int], SizeStats] = field(default_factory=lambda: defaultdict(SizeStats))
    _pending: dict[tuple[str, str], deque] = field(default_factory=lambda: defaultdict(deque), repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, op: str, group: str, group_size: int, msg_bytes: int, seconds: float | None = None) -> None:
        """Add one operation to the totals; ``seconds=None`` marks an asynchronous one (see ``add_time``)."""
        wb = wire_bytes(op, msg_bytes, group_size)
        with self._lock:
            entry = self.stats[(op, group)]
            entry.count += 1
            entry.msg_bytes += msg_bytes
            entry.wire_bytes += wb
            row = self.sizes[(op, group, msg_bytes)]
            row.group_size = group_size
            row.count += 1
            if seconds is None:
                pending = self._pending[(op, group)]
                if len(pending) >= _PENDING_LIMIT:
                    pending.popleft()
                pending.append(msg_bytes)
            else:
                entry.seconds += seconds
                row.seconds += seconds
                row.timed += 1
        if self.verbose and (not self.prof_ops or op in self.prof_ops):
            logger.info("comm op=%s group=%s n=%d msg=%d B wire=%.0f B time=%s",
                        op, group, group_size, msg_bytes, wb,
                        "async" if seconds is None else f"{seconds * 1e3:.3f} ms")

    def add_time(self, op: str, group: str, seconds: float) -> None:
        """Attribute completion time of an asynchronous operation once it has been waited on."""
        with self._lock:
            self.stats[(op, group)].seconds += seconds
            pending = self._pending.get((op, group))
            if pending:
                row = self.sizes[(op, group, pending.popleft())]
                row.seconds += seconds
                row.timed += 1

    def reset(self) -> None:
        """Forget every total (benchmarks call this at the start of a measured step)."""
        with self._lock:
            self.stats.clear()
            self.sizes.clear()
            self._pending.clear()

    def rows(self) -> list[tuple[str, str, int, SizeStats]]:
        """A consistent copy of the per-size rows: ``(op, group, msg_bytes, stats)`` sorted by op, group, size."""
        with self._lock:
            return [(op, g, n, SizeStats(s.group_size, s.count, s.seconds, s.timed))
                    for (op, g, n), s in sorted(self.sizes.items())]

    def totals(self, op: str | None = None, group: str | None = None) -> OpStats:
        """Sum over records matching ``op`` and/or ``group`` (None matches all)."""
        out = OpStats()
        with self._lock:
            for (o, g), s in self.stats.items():
                if (op is None or o == op) and (group is None or g == group):
                    out.count += s.count
                    out.msg_bytes += s.msg_bytes
                    out.wire_bytes += s.wire_bytes
                    out.seconds += s.seconds
        return out

    def summary(self) -> str:
        """A table of every (op, group) total (bytes and time); ``log_summary()`` prints the per-size rows."""
        lines = [f"{'op':<16}{'group':<14}{'count':>8}{'msg MB':>12}{'wire MB':>12}{'time ms':>12}"]
        with self._lock:
            for (op, group), s in sorted(self.stats.items()):
                lines.append(f"{op:<16}{group:<14}{s.count:>8}{s.msg_bytes / 1e6:>12.3f}"
                             f"{s.wire_bytes / 1e6:>12.3f}{s.seconds * 1e3:>12.2f}")
        return "\n".join(lines)


#: the process-wide log every collective writes to
COMMS_LOG = CommsLog()
