"""``deepspeed.runtime.config``: ``DeepSpeedConfig`` is shardwise's parsed, validated config."""

from __future__ import annotations

from typing import Any

from shardwise.config import ShardwiseConfig, load_config


def DeepSpeedConfig(config: str | dict[str, Any], mpu: Any = None, mesh_device: Any = None) -> ShardwiseConfig:  # noqa: N802 - DeepSpeed's class name
    """Parse and validate a DeepSpeed config (a dict or a JSON path) as DeepSpeed's ``DeepSpeedConfig(config)``
    does; the data-parallel size comes from ``mpu`` when given, else from torch.distributed's world."""
    from shardwise import comm

    world = mpu.get_data_parallel_world_size() if mpu is not None else comm.get_world_size()
    return load_config(config, dp_world_size=world)


__all__ = ["DeepSpeedConfig"]
