"""The Trackio backend: ``trackio.init(project=...)`` on rank 0, one ``log({name: value}, step=step)`` per event and
``finish()`` at the end (Trackio mirrors the wandb API)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shardwise.monitor.base import Event, Monitor
from shardwise.monitor.utils import require


class TrackioMonitor(Monitor):
    """Logs events to a Trackio project."""

    def __init__(self, trackio_config: Any) -> None:
        super().__init__(trackio_config)
        require("trackio")
        import trackio

        self._trackio: Any = trackio
        self.project = trackio_config.project
        self.run: Any = trackio.init(project=self.project)

    def write_events(self, event_list: Sequence[Event]) -> None:
        """One ``log`` per event, at the event's step."""
        if self.run is None:
            return
        for name, value, step in event_list:
            self._trackio.log({name: value}, step=step)

    def close(self) -> None:
        """Finish the run."""
        if self.run is not None:
            self._trackio.finish()
            self.run = None
