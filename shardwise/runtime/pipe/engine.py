"""``deepspeed.runtime.pipe.engine``: alias of ``shardwise.pipe.engine``."""

from shardwise.pipe.engine import PipelineEngine
from shardwise.pipe.module import PipelineError

__all__ = ["PipelineEngine", "PipelineError"]
