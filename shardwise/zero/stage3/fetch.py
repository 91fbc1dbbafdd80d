"""ZeRO-3's fetch/release state machine: which units are gathered, when, and the phase of the micro-step.

Module hooks (``zero/hooks.py``) call ``fetch`` before a module's forward and backward and ``release`` after its
forward; ``FetchTrace`` records the order of fetches in the first training micro-step and prefetches the next
units from then on. A unit is released unless it is persistent or needed again soon. The strategy's ``phase``
says where the micro-step is (``Phase``), which decides whether fetches are recorded.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from shardwise.zero import hooks
from shardwise.zero.external import ExternalParameterMode
from shardwise.zero.prefetch import FetchTrace
from shardwise.zero.saved_params import saved_param_hooks
from shardwise.zero.unit import ParamUnit, UnitState

if TYPE_CHECKING:
    from shardwise.zero.stage3.strategy import Stage3Strategy


class Phase(enum.Enum):
    """Where a micro-step is, as the strategy sees it."""

    IDLE = "idle"
    """Between micro-steps: the next training forward starts a new fetch trace."""
    FORWARD = "forward"
    """A training forward has started this micro-step's trace."""
    BACKWARD = "backward"
    """Between ``begin_backward`` and ``end_backward``: fetches are recorded although grad mode is off."""


class FetchRelease:
    """The fetch/release half of ``Stage3Strategy`` (the attributes are set by its ``__init__``)."""

    module: nn.Module
    trace: FetchTrace
    readahead: int
    phase: Phase
    internal: int
    _live: set[ParamUnit]
    module_units: dict[nn.Module, list[ParamUnit]]
    active_modules: list[nn.Module]
    _hooks: list

    @property
    def _in_backward(self) -> bool:
        """Between ``begin_backward`` and ``end_backward`` (read by tests that trace gathers)."""
        return self.phase is Phase.BACKWARD

    @contextlib.contextmanager
    def _rebinding(self) -> Iterator[None]:
        """The strategy itself rebinds parameters' ``.data`` meanwhile (the external-use detector ignores it)."""
        self.internal += 1
        try:
            yield
        finally:
            self.internal -= 1

    def fetch(self, units: list[ParamUnit]) -> None:
        """Make ``units`` gathered (recording the order and prefetching what the trace says comes next)."""
        with self._rebinding():
            self._fetch(units)

    def _fetch(self, units: list[ParamUnit]) -> None:
        # backward runs with grad mode off: the engine's begin/end_backward set the phase, so backward fetches are
        # recorded (and prefetched) too
        recording = self.module.training and (torch.is_grad_enabled() or self.phase is Phase.BACKWARD)
        if recording:
            for u in units:
                self.trace.on_fetch(u)
            live = sum(u.numel for u in self._live)
            for v in self.trace.upcoming(live, lambda x: x.state is not UnitState.SHARDED):
                v.gather(async_op=True)
                self._live.add(v)
            if self.readahead:  # NVMe: start reading the shards of the next units from disk
                for v in self.trace.lookahead(self.readahead):
                    v.prefetch_shard()
        for u in units:
            u.gather(async_op=False)
            self._live.add(u)

    def release(self, units: list[ParamUnit]) -> None:
        """Drop full parameters no longer needed (persistent and soon-reused units stay)."""
        with self._rebinding():
            self._release(units)

    def _release(self, units: list[ParamUnit]) -> None:
        for u in units:
            if u.persistent or u.state is UnitState.SHARDED or self.trace.needed_soon(u):
                continue
            u.release()
            self._live.discard(u)

    def release_all(self) -> None:
        """Release every non-persistent unit (end of backward, before the optimizer step)."""
        for u in list(self._live):
            if not u.persistent:
                u.release()
                self._live.discard(u)

    def before_forward(self) -> None:
        """Called by the engine before each forward: a new micro-step's trace starts after a backward."""
        if self.phase is Phase.IDLE and torch.is_grad_enabled() and self.module.training:
            self.trace.start_micro_step()
            self.phase = Phase.FORWARD

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Detect parameters used outside their module during forward (``external.py``)."""
        with ExternalParameterMode(self), saved_param_hooks(self):
            yield

    def register_external_units(self: Stage3Strategy, module: nn.Module, units: list[ParamUnit]) -> None:
        """``module``'s forward uses ``units`` too: fetch them with it from now on."""
        known = self.module_units.get(module)
        if known is None:
            self.module_units[module] = known = []
            self._hooks.extend(hooks.add_module_hooks(self, module))
        for u in units:
            if u not in known:
                known.append(u)
