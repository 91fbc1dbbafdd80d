"""``deepspeed.runtime.engine``: ``DeepSpeedEngine`` is shardwise's :class:`~shardwise.engine.Engine`."""

from shardwise.engine import Engine

DeepSpeedEngine = Engine

__all__ = ["DeepSpeedEngine"]
