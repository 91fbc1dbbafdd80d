"""``MonitorMaster``: DeepSpeed's fan-out of training events to every enabled backend, on rank 0 only.

An event is ``(name, value, step)``; the engine's steps are global sample counts (``engine.global_samples``), as
DeepSpeed's. ``engine.monitor.write_events([...])`` is how users add their own metrics. Backends are created only
on rank 0 (other ranks hold a MonitorMaster with no backends, so calling ``write_events`` anywhere is safe), and
each backend imports its package only when it is enabled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shardwise import comm
from shardwise.monitor.base import Event, Monitor
from shardwise.monitor.comet import CometMonitor
from shardwise.monitor.csv_monitor import csvMonitor
from shardwise.monitor.tensorboard import TensorBoardMonitor
from shardwise.monitor.trackio import TrackioMonitor
from shardwise.monitor.wandb import WandbMonitor

__all__ = ["BACKEND_BLOCKS", "Event", "Monitor", "MonitorMaster"]

BACKEND_BLOCKS = ("tensorboard", "wandb", "csv_monitor", "comet", "trackio")


def _section(config: Any, name: str) -> Any:
    section = getattr(config, name, None)
    return section if section is not None and getattr(section, "enabled", False) else None


_BACKENDS: dict[str, type[Monitor]] = {
    "tensorboard": TensorBoardMonitor, "wandb": WandbMonitor, "csv_monitor": csvMonitor, "comet": CometMonitor,
    "trackio": TrackioMonitor,
}


def _build(name: str, section: Any) -> Monitor:
    return _BACKENDS[name](section)


class MonitorMaster(Monitor):
    """Every enabled backend of ``monitor_config`` (an object with ``tensorboard``, ``wandb``, ``csv_monitor``,
    ``comet`` and ``trackio`` sections, such as the engine's config), driven together."""

    def __init__(self, monitor_config: Any) -> None:
        super().__init__(monitor_config)
        sections = {name: _section(monitor_config, name) for name in BACKEND_BLOCKS}
        #: same value on every rank (it decides whether the engine gathers the loss for the events)
        self.enabled = any(s is not None for s in sections.values())
        self.backends: dict[str, Monitor] = {}
        if comm.get_rank() == 0:
            for name, section in sections.items():
                if section is not None:
                    self.backends[name] = _build(name, section)

    @property
    def tb_monitor(self) -> Monitor | None:
        """The TensorBoard backend (DeepSpeed's attribute name)."""
        return self.backends.get("tensorboard")

    @property
    def wandb_monitor(self) -> Monitor | None:
        """The Weights & Biases backend."""
        return self.backends.get("wandb")

    @property
    def csv_monitor(self) -> Monitor | None:
        """The CSV backend."""
        return self.backends.get("csv_monitor")

    @property
    def comet_monitor(self) -> Monitor | None:
        """The Comet backend."""
        return self.backends.get("comet")

    @property
    def trackio_monitor(self) -> Monitor | None:
        """The Trackio backend."""
        return self.backends.get("trackio")

    def write_events(self, event_list: Sequence[Event]) -> None:
        """Send ``event_list`` to every backend (a no-op on ranks other than 0)."""
        events = [(str(name), _plain(value), int(step)) for name, value, step in event_list]
        for backend in self.backends.values():
            backend.write_events(events)

    def close(self) -> None:
        """Finish every backend (``engine.destroy()`` calls this); later events are dropped."""
        backends, self.backends = self.backends, {}
        for backend in backends.values():
            backend.close()


def _plain(value: Any) -> Any:
    """A Python number for tensors and numpy scalars (every backend accepts those)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value
