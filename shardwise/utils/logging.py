"""``deepspeed.utils.logging``: the shardwise logger and ``log_dist``; they live in ``shardwise/common/logging.py``."""

from shardwise.common.logging import human_bytes, log_dist, logger

__all__ = ["human_bytes", "log_dist", "logger"]
