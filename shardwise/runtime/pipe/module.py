"""``deepspeed.runtime.pipe.module``: alias of ``shardwise.pipe.module`` and ``shardwise.pipe.spec``."""

from shardwise.pipe.module import PipelineError, PipelineModule
from shardwise.pipe.spec import LayerSpec, TiedLayerSpec

__all__ = ["LayerSpec", "PipelineError", "PipelineModule", "TiedLayerSpec"]
