"""``deepspeed.runtime.pipe.topology``: alias of ``shardwise.pipe.topology`` (and the grid of ``pipe.grid``)."""

from shardwise.pipe.grid import PipelineParallelGrid
from shardwise.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology

__all__ = ["PipeDataParallelTopology", "PipeModelDataParallelTopology", "PipelineParallelGrid", "ProcessTopology"]
