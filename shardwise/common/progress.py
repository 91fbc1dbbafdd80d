"""Progress of long, non-training work: checkpoint save/load/reshard/consolidation and inference weight loading.

``progress(items, "writing rank 0 shard", weight=nbytes)`` wraps an iterable. Work that finishes within ``delay``
seconds (2 s by default) prints nothing, so tests and small models stay quiet. Longer work shows a tqdm bar when
stderr is a terminal and tqdm is installed, and otherwise one log line every ``interval`` seconds (10 s by default)
with the fraction done, the rate and the time left, which is what batch jobs whose output goes to a file need.
Only one rank reports (rank 0 of the job, or the process itself when torch.distributed is not started): every
rank of a save or load does the same amount of work, so one rank's progress speaks for all.

``SHARDWISE_PROGRESS=0`` silences it; ``SHARDWISE_PROGRESS=1`` reports from the first item (no delay).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, TypeVar

from shardwise.common.logging import logger

T = TypeVar("T")

DELAY_SECONDS = 2.0
INTERVAL_SECONDS = 10.0


def _reporting_rank() -> bool:
    try:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except Exception:  # no usable torch.distributed: a single process reports
        return True


def _human(value: float, unit: str) -> str:
    if unit != "B":
        text = f"{value:.3g}" if value < 1000 else f"{value:,.0f}"
        return f"{text} {unit}" if unit else text
    for name, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {name}"
    return f"{value:.0f} B"


class _LineReporter:
    """Periodic log lines for non-terminal output."""

    def __init__(self, desc: str, total: float, unit: str, interval: float, start: float) -> None:
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.start = start
        self.last = -float("inf")
        self.shown = False

    def update(self, done: float, now: float) -> None:
        if now - self.last < self.interval:
            return
        self.last, self.shown = now, True
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        if self.total:
            left = (self.total - done) / rate if rate > 0 else float("inf")
            logger.info("%s: %.0f%% (%s of %s, %s/s, about %.0f s left)", self.desc, 100 * done / self.total,
                        _human(done, self.unit), _human(self.total, self.unit), _human(rate, self.unit), left)
        else:
            logger.info("%s: %s done (%s/s)", self.desc, _human(done, self.unit), _human(rate, self.unit))

    def close(self, done: float) -> None:
        if self.shown:
            logger.info("%s: done, %s in %.1f s", self.desc, _human(done, self.unit), time.perf_counter() - self.start)


class _BarReporter:
    """A tqdm bar (terminals only)."""

    def __init__(self, desc: str, total: float, unit: str) -> None:
        from tqdm import tqdm

        whole = int(total) if float(total).is_integer() else total
        self.bar = tqdm(total=whole or None, desc=desc, unit=unit or "it", unit_scale=unit == "B",
                        unit_divisor=1024 if unit == "B" else 1000, leave=False, file=sys.stderr)
        self.done = 0.0

    def update(self, done: float, now: float) -> None:
        self.bar.update(done - self.done)
        self.done = done

    def close(self, done: float) -> None:
        self.update(done, 0.0)
        self.bar.close()


def _make_reporter(desc: str, total: float, unit: str, interval: float, start: float) -> Any:
    if sys.stderr.isatty():
        try:
            return _BarReporter(desc, total, unit)
        except ImportError:  # tqdm is optional
            pass
    return _LineReporter(desc, total, unit, interval, start)


def progress(items: Iterable[T], desc: str, *, weight: Callable[[T], float] | None = None, unit: str = "",
             total: float | None = None, delay: float | None = None,
             interval: float = INTERVAL_SECONDS) -> Iterator[T]:
    """Yield ``items`` unchanged while reporting progress (see the module docstring).

    ``weight(item)`` is each item's share of the work (bytes, say, with ``unit="B"``); without it every item
    counts 1. ``total`` defaults to the sum of the weights (or ``len(items)``) when ``items`` is a sized collection.
    """
    setting = os.environ.get("SHARDWISE_PROGRESS", "")
    if setting == "0" or not _reporting_rank():
        yield from items
        return
    if delay is None:
        delay = 0.0 if setting == "1" else DELAY_SECONDS
    if total is None and isinstance(items, Sized):
        items = list(items)
        total = float(sum(weight(i) for i in items)) if weight is not None else float(len(items))
    start = time.perf_counter()
    reporter: Any = None
    done = 0.0
    try:
        for item in items:
            yield item
            done += weight(item) if weight is not None else 1.0
            now = time.perf_counter()
            if reporter is None and now - start >= delay:
                reporter = _make_reporter(desc, total or 0.0, unit, interval, start)
            if reporter is not None:
                reporter.update(done, now)
    finally:
        if reporter is not None:
            reporter.close(done)
