"""``deepspeed.runtime.zero.config``: the ``zero_optimization`` section's model under DeepSpeed's names."""

from shardwise.config import OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig

DeepSpeedZeroConfig = ZeroConfig
DeepSpeedZeroOffloadParamConfig = OffloadParamConfig
DeepSpeedZeroOffloadOptimizerConfig = OffloadOptimizerConfig

__all__ = ["DeepSpeedZeroConfig", "DeepSpeedZeroOffloadOptimizerConfig", "DeepSpeedZeroOffloadParamConfig"]
