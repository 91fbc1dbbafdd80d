"""The Weights & Biases backend: ``wandb.init(project, group, entity=team)`` on rank 0 and one ``log({name: value},
step=step)`` per event, as DeepSpeed. Offline runs (``WANDB_MODE=offline``) are written under ``WANDB_DIR``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shardwise.monitor.base import Event, Monitor
from shardwise.monitor.utils import require


class WandbMonitor(Monitor):
    """Logs events to a W&B run."""

    def __init__(self, wandb_config: Any) -> None:
        super().__init__(wandb_config)
        require("wandb")
        import wandb

        self.group, self.team, self.project = wandb_config.group, wandb_config.team, wandb_config.project
        self.run: Any = wandb.init(project=self.project, group=self.group, entity=self.team)

    def log(self, data: dict[str, Any], step: int | None = None, commit: bool | None = None) -> None:
        """``wandb.log`` on this monitor's run."""
        if self.run is not None:
            self.run.log(data, step=step, commit=commit)

    def write_events(self, event_list: Sequence[Event]) -> None:
        """One ``log`` per event, at the event's step."""
        for name, value, step in event_list:
            self.log({name: value}, step=step)

    def close(self) -> None:
        """Finish the run (writes its summary; an offline run's files are complete after this)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
