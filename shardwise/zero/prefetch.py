"""Prefetch for ZeRO-3: replay the order units were fetched in the previous micro-step, ahead of need.

The first micro-step records the sequence of fetch requests (forward pre-hooks, then backward pre-hooks). From the
next micro-step on, each request at position ``i`` checks that the model is following the recorded order and
launches asynchronous gathers for the units that come next, up to ``bucket_numel`` elements ahead and never more
than ``max_live_numel`` gathered at once. A request that differs from the record (a data-dependent branch, a new
module) invalidates the trace; it is re-recorded from that micro-step on. ``reuse_distance`` tells the release
logic whether a unit is needed again soon (then it stays gathered).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FetchTrace:
    """The recorded fetch order and a cursor into it."""

    def __init__(self, bucket_numel: int, max_live_numel: int, reuse_distance: int) -> None:
        self.bucket_numel = bucket_numel
        self.max_live_numel = max_live_numel
        self.reuse_distance = reuse_distance
        self.recorded: list[Any] = []  # units, in fetch order, of the last complete micro-step
        self._recording: list[Any] = []
        self._cursor = 0
        self._valid = False
        self.invalidations = 0

    def start_micro_step(self) -> None:
        """A new forward begins: the previous recording (if complete and consistent) becomes the trace."""
        if self._recording:
            if not self._valid or self._recording != self.recorded:
                self.recorded = self._recording
            self._valid = True
        self._recording = []
        self._cursor = 0

    def on_fetch(self, unit: Any) -> None:
        """Record a fetch request and check it against the trace."""
        self._recording.append(unit)
        if not self._valid:
            return
        if self._cursor < len(self.recorded) and self.recorded[self._cursor] is unit:
            self._cursor += 1
            return
        self._valid = False  # the order changed: stop prefetching until a new trace is recorded
        self.invalidations += 1

    def upcoming(self, live_numel: int, is_gathered: Callable[[Any], bool]) -> list[Any]:
        """Units to gather now, in order: those not gathered yet among the distinct units that start within
        ``bucket_numel`` elements of the cursor (gathered ones count towards that distance too, so the window
        never reaches past it), within the live budget."""
        if not self._valid:
            return []
        out, ahead, new, seen = [], 0, 0, set()
        for unit in self.recorded[self._cursor :]:
            if id(unit) in seen:
                continue
            seen.add(id(unit))
            if ahead >= self.bucket_numel:
                break
            ahead += unit.numel
            if is_gathered(unit):
                continue
            if live_numel + new + unit.numel > self.max_live_numel:
                break
            out.append(unit)
            new += unit.numel
        return out

    def lookahead(self, count: int) -> list[Any]:
        """The next ``count`` distinct units of the trace (for disk read-ahead, further out than gathers)."""
        if not self._valid:
            return []
        out: list[Any] = []
        for unit in self.recorded[self._cursor :]:
            if unit not in out:
                out.append(unit)
                if len(out) >= count:
                    break
        return out

    def needed_soon(self, unit: Any) -> bool:
        """Whether ``unit`` is fetched again within ``reuse_distance`` elements of other fetches."""
        if not self._valid or self.reuse_distance <= 0:
            return False
        distance = 0
        for other in self.recorded[self._cursor :]:
            if other is unit:
                return True
            distance += other.numel
            if distance > self.reuse_distance:
                return False
        return False
