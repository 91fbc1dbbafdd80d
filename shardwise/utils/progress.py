"""Progress reporting on long work; it lives in ``shardwise/common/progress.py`` (this path stays importable)."""

from shardwise.common.progress import progress

__all__ = ["progress"]
