"""The Comet backend: ``comet_ml.start(...)`` with the config's keys on rank 0; each event name is logged at most
once per ``samples_log_interval`` samples, as DeepSpeed does (the first occurrence always)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shardwise.monitor.base import Event, Monitor
from shardwise.monitor.utils import require


class EventsLogScheduler:
    """Per event name: whether enough samples have passed since it was last logged."""

    def __init__(self, samples_log_interval: int) -> None:
        self.samples_log_interval = samples_log_interval
        self._last: dict[str, int] = {}

    def needs_logging(self, name: str, current_sample: int) -> bool:
        """True (and remember ``current_sample``) when ``name`` is due."""
        last = self._last.get(name)
        if last is None or current_sample - last >= self.samples_log_interval:
            self._last[name] = current_sample
            return True
        return False


class CometMonitor(Monitor):
    """Logs events as Comet metrics."""

    def __init__(self, comet_config: Any) -> None:
        super().__init__(comet_config)
        require("comet")
        import comet_ml

        self.samples_log_interval = comet_config.samples_log_interval
        self._scheduler = EventsLogScheduler(comet_config.samples_log_interval)
        self.experiment: Any = comet_ml.start(api_key=comet_config.api_key, project=comet_config.project,
                                              workspace=comet_config.workspace,
                                              experiment_key=comet_config.experiment_key, mode=comet_config.mode,
                                              online=comet_config.online)
        if comet_config.experiment_name is not None:
            self.experiment.set_name(comet_config.experiment_name)

    def write_events(self, event_list: Sequence[Event]) -> None:
        """``log_metric(name, value, step=samples)`` for each event that is due."""
        if self.experiment is None:
            return
        for name, value, step in event_list:
            if self._scheduler.needs_logging(name, step):
                self.experiment.log_metric(name, value, step=step)

    def close(self) -> None:
        """End the experiment (an offline one writes its archive now)."""
        if self.experiment is not None:
            self.experiment.end()
            self.experiment = None
