"""DeepSpeed-compatible configuration: parse, validate and resolve a ds_config into a frozen ShardwiseConfig.

Public surface::

    from shardwise.config import load_config, ShardwiseConfig, ConfigError, add_config_arguments
    cfg = load_config("ds_config.json", dp_world_size=2)
    cfg.train_micro_batch_size_per_gpu, cfg.zero_optimization.stage, cfg.fp16.enabled

This package imports nothing else of shardwise: the engine reads it, it reads nobody. What shardwise
implements is the table in ``support.py``; how configs are accepted is described in docs/config.md.
"""

from .args import add_config_arguments
from .errors import ConfigError
from .loader import autotp_size, load_config, read_config_dict, sequence_parallel_size
from .schema import ShardwiseConfig
from .schema_precision import BF16Config, DataTypesConfig, FP16Config
from .schema_training import (
    ActivationCheckpointingConfig,
    CheckpointConfig,
    OptimizerConfig,
    PipelineConfig,
    SchedulerConfig,
    TensorParallelConfig,
)
from .schema_zero import OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig

__all__ = [
    "ActivationCheckpointingConfig",
    "BF16Config",
    "CheckpointConfig",
    "ConfigError",
    "DataTypesConfig",
    "FP16Config",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "OptimizerConfig",
    "PipelineConfig",
    "SchedulerConfig",
    "ShardwiseConfig",
    "read_config_dict",
    "sequence_parallel_size",
    "autotp_size",
    "TensorParallelConfig",
    "ZeroConfig",
    "add_config_arguments",
    "load_config",
]
