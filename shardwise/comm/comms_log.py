"""The comms log: bytes and time per collective, per process group.

Every collective issued through ``shardwise.comm`` is recorded here (a dict increment, always on), so tests can
assert communication volume against theory and benchmarks can report bytes per step. ``comms_logger.verbose``
additionally logs each operation as it happens, as DeepSpeed's comms logger does.

Two byte counts are kept per record:
* ``msg_bytes``: the size of the full (unsharded) buffer the operation is about, e.g. the whole gathered tensor for
  an all-gather: "an all-gather of P elements" in ZeRO papers is ``msg_bytes == 4P`` in fp32;
* ``wire_bytes``: what this rank sends on a ring/bus algorithm (nccl-tests' "bus bandwidth" convention):
  all-reduce ``2(n-1)/n * S``, all-gather and reduce-scatter ``(n-1)/n * S``, broadcast ``S``, send ``S``.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
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
class CommsLog:
    """Per-(op, group) totals since the last ``reset()``."""

    verbose: bool = False
    prof_ops: tuple[str, ...] = ()
    stats: dict[tuple[str, str], OpStats] = field(default_factory=lambda: defaultdict(OpStats))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, op: str, group: str, group_size: int, msg_bytes: int, seconds: float = 0.0) -> None:
        """Add one operation to the totals."""
        wb = wire_bytes(op, msg_bytes, group_size)
        with self._lock:
            entry = self.stats[(op, group)]
            entry.count += 1
            entry.msg_bytes += msg_bytes
            entry.wire_bytes += wb
            entry.seconds += seconds
        if self.verbose and (not self.prof_ops or op in self.prof_ops):
            logger.info("comm op=%s group=%s n=%d msg=%d B wire=%.0f B time=%.3f ms",
                        op, group, group_size, msg_bytes, wb, seconds * 1e3)

    def add_time(self, op: str, group: str, seconds: float) -> None:
        """Attribute completion time of an asynchronous operation once it has been waited on."""
        with self._lock:
            self.stats[(op, group)].seconds += seconds

    def reset(self) -> None:
        """Forget every total (benchmarks call this at the start of a measured step)."""
        with self._lock:
            self.stats.clear()

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
        """A table of every (op, group) total, for ``log_summary()``."""
        lines = [f"{'op':<16}{'group':<14}{'count':>8}{'msg MB':>12}{'wire MB':>12}{'time ms':>12}"]
        with self._lock:
            for (op, group), s in sorted(self.stats.items()):
                lines.append(f"{op:<16}{group:<14}{s.count:>8}{s.msg_bytes / 1e6:>12.3f}"
                             f"{s.wire_bytes / 1e6:>12.3f}{s.seconds * 1e3:>12.2f}")
        return "\n".join(lines)


#: the process-wide log every collective writes to
COMMS_LOG = CommsLog()
