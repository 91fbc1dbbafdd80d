"""Utilities users import from ``deepspeed.utils``: logging, ZeRO inspection helpers, RepeatingLoader."""

from shardwise.utils.logging import log_dist, logger
from shardwise.utils.repeating_loader import RepeatingLoader

__all__ = ["RepeatingLoader", "log_dist", "logger"]
