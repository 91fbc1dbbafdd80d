"""``deepspeed.monitor.config``: the monitor sections on their own, for building a ``MonitorMaster`` outside the
engine (``MonitorMaster(get_monitor_config(ds_config_dict))``). The sections are the config package's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shardwise.config.schema_monitor import CometConfig, CSVMonitorConfig, TensorBoardConfig, TrackioConfig, WandbConfig

CSVConfig = CSVMonitorConfig  # DeepSpeed's name


@dataclass(frozen=True)
class DeepSpeedMonitorConfig:
    """The five monitor blocks and whether any is enabled."""

    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    csv_monitor: CSVMonitorConfig = field(default_factory=CSVMonitorConfig)
    comet: CometConfig = field(default_factory=CometConfig)
    trackio: TrackioConfig = field(default_factory=TrackioConfig)

    @property
    def enabled(self) -> bool:
        """Whether any backend is enabled."""
        return any(getattr(self, n).enabled for n in ("tensorboard", "wandb", "csv_monitor", "comet", "trackio"))


def get_monitor_config(param_dict: dict[str, Any]) -> DeepSpeedMonitorConfig:
    """The monitor blocks of a ds_config dict, validated by the same sections ``initialize`` uses."""
    kinds = {"tensorboard": TensorBoardConfig, "wandb": WandbConfig, "csv_monitor": CSVMonitorConfig,
             "comet": CometConfig, "trackio": TrackioConfig}
    return DeepSpeedMonitorConfig(**{k: cls(**(param_dict.get(k) or {})) for k, cls in kinds.items()})
