"""The backend interface every monitor implements (``Monitor``) and the event type (``Event``)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

Event = tuple[str, Any, int]


class Monitor(abc.ABC):
    """One backend: writes events, and releases its files or run on ``close()``."""

    def __init__(self, monitor_config: Any) -> None:
        self.monitor_config = monitor_config
        self.enabled = bool(getattr(monitor_config, "enabled", False))

    @abc.abstractmethod
    def write_events(self, event_list: Sequence[Event]) -> None:
        """Record every ``(name, value, step)`` of ``event_list``."""

    def close(self) -> None:  # noqa: B027 - optional hook; most backends need nothing
        """Flush and release the backend (end of training)."""
