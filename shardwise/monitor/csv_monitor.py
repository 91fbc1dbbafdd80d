"""The CSV backend, with DeepSpeed's layout: one file per event under ``output_path/job_name/``, named after the
event with ``/`` and spaces turned into ``_`` (``Train/Samples/lr`` -> ``Train_Samples_lr.csv``), holding a header
``step,<last part of the name>`` and then one ``step,value`` row per event.

One difference: the header is written when the file is new or empty, not once per process as DeepSpeed does, so
a resumed run appends rows to its file instead of a second header.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

from shardwise.monitor.base import Event, Monitor


def event_file_name(name: str) -> str:
    """The CSV file name DeepSpeed uses for an event name."""
    return name.replace("/", "_").replace(" ", "_") + ".csv"


class csvMonitor(Monitor):  # noqa: N801 - DeepSpeed's class name
    """Appends events to per-event CSV files."""

    def __init__(self, csv_config: Any) -> None:
        super().__init__(csv_config)
        self.log_dir = os.path.join(csv_config.output_path or "", csv_config.job_name)
        os.makedirs(self.log_dir, exist_ok=True)

    def write_events(self, event_list: Sequence[Event]) -> None:
        """Append one row per event to its file."""
        for name, value, step in event_list:
            path = os.path.join(self.log_dir, event_file_name(name))
            new = not os.path.exists(path) or os.path.getsize(path) == 0
            with open(path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(["step", name.split("/")[-1]])
                writer.writerow([step, value])
