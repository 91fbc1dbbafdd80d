"""The training engine: ``Engine`` (DeepSpeed's ``DeepSpeedEngine``) and its builder."""

from shardwise.engine.engine import Engine

__all__ = ["Engine"]
