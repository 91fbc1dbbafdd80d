"""Wall-clock timers synchronised with the accelerator (``wall_clock_breakdown``).

``totals`` restart at every ``reset()`` (the step log's window); ``lifetime_ms()`` never restarts and includes
timers still running, so the monitors can take per-step differences whatever the step log does.
"""

from __future__ import annotations

import time
from collections import defaultdict

from shardwise.accelerator import get_accelerator


class Timers:
    """Named, accumulating timers: ``with timers("forward"): ...``; ``timers.means()`` per step."""

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._lifetime: dict[str, float] = defaultdict(float)
        self._name: list[str] = []
        self._start: list[float] = []

    def __call__(self, name: str) -> Timers:
        self._name.append(name)
        return self

    def __enter__(self) -> Timers:
        if self.synchronize:
            get_accelerator().synchronize()
        self._start.append(time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.synchronize:
            get_accelerator().synchronize()
        name, start = self._name.pop(), self._start.pop()
        elapsed = time.perf_counter() - start
        self.totals[name] += elapsed
        self._lifetime[name] += elapsed
        self.counts[name] += 1

    def reset(self) -> None:
        """Forget all totals."""
        self.totals.clear()
        self.counts.clear()

    def lifetime_ms(self) -> dict[str, float]:
        """Milliseconds per timer since construction, including the running part of timers not yet stopped."""
        out = dict(self._lifetime)
        now = time.perf_counter()
        for name, start in zip(self._name, self._start):
            out[name] = out.get(name, 0.0) + (now - start)
        return {k: v * 1e3 for k, v in out.items()}

    def summary_ms(self) -> dict[str, float]:
        """Total milliseconds per timer since the last reset."""
        return {k: v * 1e3 for k, v in self.totals.items()}
