"""The shardwise logger and ``log_dist`` (log on chosen ranks only), as DeepSpeed's ``deepspeed.utils.logger``."""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

logger = logging.getLogger("shardwise")


def _setup() -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [shardwise] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("SHARDWISE_LOG_LEVEL", "INFO").upper())
    logger.propagate = False


_setup()


def log_dist(message: str, ranks: list[int] | None = (0,), level: int = logging.INFO) -> None:
    """Log ``message`` on the listed global ranks (``None`` or ``[-1]``: every rank), prefixed with the rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if ranks is None or -1 in ranks or rank in ranks:
        logger.log(level, "[rank %d] %s", rank, message)


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KB'``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
