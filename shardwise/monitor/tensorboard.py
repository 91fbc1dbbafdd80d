"""The TensorBoard backend: ``torch.utils.tensorboard.SummaryWriter`` writing to ``output_path/job_name`` (as
DeepSpeed), one scalar per event, flushed after every batch of events so a live TensorBoard sees each step."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from shardwise.monitor.base import Event, Monitor
from shardwise.monitor.utils import require


class TensorBoardMonitor(Monitor):
    """Writes events as TensorBoard scalars."""

    def __init__(self, tensorboard_config: Any) -> None:
        super().__init__(tensorboard_config)
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.path.join(tensorboard_config.output_path or "", tensorboard_config.job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self.summary_writer: Any = SummaryWriter(log_dir=self.log_dir)

    def write_events(self, event_list: Sequence[Event], flush: bool = True) -> None:
        """``add_scalar(name, value, step)`` for each event, then flush."""
        if self.summary_writer is None:
            return
        for name, value, step in event_list:
            self.summary_writer.add_scalar(name, value, step)
        if flush:
            self.summary_writer.flush()

    def flush(self) -> None:
        """Push buffered events to disk."""
        if self.summary_writer is not None:
            self.summary_writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.summary_writer is not None:
            self.summary_writer.close()
            self.summary_writer = None
