"""Pipeline parallelism (``deepspeed.pipe``): ``PipelineModule``, ``LayerSpec``, ``TiedLayerSpec`` and topologies.

Build the model as a ``PipelineModule`` of layers, pass it to ``shardwise.initialize``, and train with
``engine.train_batch(data_iter)``. Schedules (1F1B, interleaved 1F1B, inference) are pure instruction lists in
``schedule.py``; the engine is ``engine.PipelineEngine``.
"""

from shardwise.pipe.module import PipelineError, PipelineModule
from shardwise.pipe.spec import LayerSpec, TiedLayerSpec
from shardwise.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology

__all__ = [
    "LayerSpec", "PipeDataParallelTopology", "PipeModelDataParallelTopology", "PipelineError", "PipelineModule",
    "ProcessTopology", "TiedLayerSpec",
]
