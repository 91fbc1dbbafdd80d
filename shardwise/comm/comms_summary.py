"""``deepspeed.comm.log_summary()``: the comms log as DeepSpeed's table of operation, message size, count, total and
average latency, algorithmic bandwidth and bus bandwidth, optionally with the straggler breakdown.

Bandwidths follow DeepSpeed's conventions, in Gbps (10^9 bits per second), from this rank's totals for the row:
* algbw (DeepSpeed's ``tput_avg``): the message over the latency, with all-reduce counted twice (``2S/t``), as
  DeepSpeed does. ``S`` is the full buffer (the gathered tensor of an all-gather, the input of a reduce-scatter):
  DeepSpeed logs an all-gather's per-rank input and multiplies by the world size, which is the same number.
* busbw: the bytes a ring algorithm moves per rank over the latency (``comms_log.wire_bytes``), e.g.
  ``2(n-1)/n * S / t`` for an all-reduce, with ``n`` the size of the operation's group (DeepSpeed uses the world
  size, which differs only for sub-groups).
Averages are totals over totals (DeepSpeed averages per-call bandwidths with a 10% trimmed mean); latencies are
what the collective took on this rank, including waiting for slower peers, which the straggler breakdown separates.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from shardwise.comm.comms_log import COMMS_LOG, SizeStats, wire_bytes

_HEADER = ("Comm. Op", "Message Size", "Count", "Total Latency(ms)", "Avg Latency(ms)", "tput_avg (Gbps)",
           "busbw_avg (Gbps)")
_STRAGGLER_HEADER = ("Comm. Op", "Message Size", "Count", "Total comm lat(ms)", "Total straggler(ms)",
                     "Avg comm lat(ms)", "Avg straggler(ms)")
_WIDTH = 20


def convert_size(size_bytes: float) -> str:
    """A byte count in binary units, as DeepSpeed prints message sizes ("1.5 KB")."""
    if size_bytes <= 0:
        return "0B"
    names = ("B", "KB", "MB", "GB", "TB", "PB")
    i = min(int(math.floor(math.log(size_bytes, 1024))), len(names) - 1)
    return f"{round(size_bytes / 1024**i, 2)} {names[i]}"


def bandwidths(op: str, msg_bytes: int, group_size: int, seconds: float) -> tuple[float, float]:
    """(algbw, busbw) in Gbps for ``msg_bytes`` moved by ``op`` in ``seconds`` (see the module docstring)."""
    if seconds <= 0:
        return 0.0, 0.0
    alg = (2 if op == "all_reduce" else 1) * msg_bytes / seconds
    bus = wire_bytes(op, msg_bytes, group_size) / seconds
    return alg * 8 / 1e9, bus * 8 / 1e9


def _record_name(op: str, group: str) -> str:
    return op if group in ("world", "") else f"{op} [{group}]"


def _row_dict(op: str, msg_bytes: int, s: SizeStats) -> dict[str, Any]:
    total_ms = s.seconds * 1e3
    per_op = s.seconds / s.timed if s.timed else 0.0
    alg, bus = bandwidths(op, msg_bytes, s.group_size, per_op)
    return {"count": s.count, "total_latency_ms": total_ms, "avg_latency_ms": per_op * 1e3, "tput_avg_gbps": alg,
            "busbw_avg_gbps": bus, "msg_size_bytes": msg_bytes, "msg_size_str": convert_size(msg_bytes)}


def summary(rows: list[tuple[str, str, int, SizeStats]] | None = None) -> dict[str, dict[int, dict[str, Any]]]:
    """``{record name: {message bytes: {count, total_latency_ms, avg_latency_ms, tput_avg_gbps, busbw_avg_gbps,
    msg_size_bytes, msg_size_str}}}``; the record name is the op, plus ``[group]`` for groups other than world."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for op, group, msg_bytes, s in COMMS_LOG.rows() if rows is None else rows:
        out.setdefault(_record_name(op, group), {})[msg_bytes] = _row_dict(op, msg_bytes, s)
    return out


def _line(cells: tuple) -> str:
    return "".join(f"{c:<{_WIDTH}.2f}" if isinstance(c, float) else f"{c!s:<{_WIDTH}}" for c in cells).rstrip()


def render(table: dict[str, dict[int, dict[str, Any]]]) -> str:
    """The summary as DeepSpeed prints it: a header, then each op on its own line followed by one line per size."""
    lines = [_line(_HEADER)]
    for name, by_size in table.items():
        lines.append(name)
        for size in sorted(by_size):
            r = by_size[size]
            lines.append(_line(("", r["msg_size_str"], r["count"], r["total_latency_ms"], r["avg_latency_ms"],
                                r["tput_avg_gbps"], r["busbw_avg_gbps"])))
    return "\n".join(lines)


def stragglers(table: dict[str, dict[int, dict[str, Any]]],
               all_tables: list[dict[str, dict[int, dict[str, Any]]]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Per row: the fastest rank's total latency (the communication itself) and this rank's excess over it (time
    spent waiting for slower peers). ``all_tables`` holds every rank's ``summary()``."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name, by_size in table.items():
        for size, r in by_size.items():
            peers = [t[name][size]["total_latency_ms"] for t in all_tables if size in t.get(name, {})]
            fastest = min(peers) if peers else r["total_latency_ms"]
            excess = r["total_latency_ms"] - fastest
            n = max(r["count"], 1)
            out.setdefault(name, {})[size] = {
                "count": r["count"], "total_comm_lat_ms": fastest, "total_straggler_ms": excess,
                "avg_comm_lat_ms": fastest / n, "avg_straggler_ms": excess / n, "msg_size_bytes": size,
                "msg_size_str": r["msg_size_str"]}
    return out


def render_stragglers(table: dict[str, dict[int, dict[str, Any]]]) -> str:
    """The straggler breakdown in DeepSpeed's layout."""
    lines = ["_______________________________", "Breakdown with straggler effect", "-------------------------------",
             _line(_STRAGGLER_HEADER)]
    for name, by_size in table.items():
        lines.append(name)
        for size in sorted(by_size):
            r = by_size[size]
            lines.append(_line(("", r["msg_size_str"], r["count"], r["total_comm_lat_ms"], r["total_straggler_ms"],
                                r["avg_comm_lat_ms"], r["avg_straggler_ms"])))
    return "\n".join(lines)


def metadata(rank: int, world_size: int) -> dict[str, Any]:
    """The ``metadata`` entry of ``log_summary(return_dict=True)``."""
    return {"world_size": world_size, "rank": rank, "timestamp": datetime.now().isoformat()}
