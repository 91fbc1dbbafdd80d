"""``deepspeed.monitor``: training events to TensorBoard, Weights & Biases, Comet, Trackio and CSV files.

``monitor.py`` fans events out on rank 0; one module per backend (imported only when enabled); ``utils.py`` checks
the optional packages at ``initialize``; ``training.py`` is the engine's side (which events, when);
``plot.py`` is the ``shardwise-plot`` command that draws a run's events.
"""

from shardwise.monitor.monitor import Event, Monitor, MonitorMaster
from shardwise.monitor.utils import check_backends

__all__ = ["Event", "Monitor", "MonitorMaster", "check_backends"]
