"""Tensor parallelism: split layers, the autograd mappings between regions, vocabulary-parallel cross-entropy,
the RNG tracker, the ``mpu`` bridge, declarative plans and AutoTP training of Hugging Face models
(``tp_model_init``; the plans of every tensor-parallel path are resolved in ``resolve.py``).

Typical use (Megatron style)::

    topo = Topology(tp=2)
    layer = ColumnParallelLinear(1024, 4096, group=topo.tp_group)        # or .from_linear(full_linear, topo)
    model = apply_plan(full_model, {"layers.*.wqkv": "colwise", "layers.*.wo": "rowwise"}, topo)
"""

from shardwise.tp.autotp import AutoTPTrainingError, tp_model_init
from shardwise.tp.cross_entropy import vocab_parallel_cross_entropy
from shardwise.tp.layers import (
    PARALLEL_LAYERS,
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_tensor_parallel,
)
from shardwise.tp.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from shardwise.tp.mpu import ModelParallelUnit, MpuLayoutError, topology_from_mpu
from shardwise.tp.partition import DimSplit, SplitError, partition_sizes
from shardwise.tp.plans import (
    ColwiseParallel,
    LocalHeads,
    PlanError,
    RowwiseParallel,
    SequenceParallel,
    VocabParallel,
    apply_plan,
    plan_for,
)
from shardwise.tp.random import (
    RNGStatesTracker,
    get_cuda_rng_tracker,
    model_parallel_cuda_manual_seed,
)
from shardwise.tp.state import full_state_dict, load_full_state_dict

__all__ = [
    "AutoTPTrainingError", "tp_model_init",
    "PARALLEL_LAYERS", "ColumnParallelLinear", "ColwiseParallel", "DimSplit", "LocalHeads", "ModelParallelUnit",
    "MpuLayoutError", "PlanError", "RNGStatesTracker", "RowParallelLinear", "RowwiseParallel", "SequenceParallel",
    "SplitError", "VocabParallel", "VocabParallelEmbedding", "apply_plan", "copy_to_tensor_model_parallel_region",
    "full_state_dict", "gather_from_sequence_parallel_region", "gather_from_tensor_model_parallel_region",
    "get_cuda_rng_tracker", "load_full_state_dict", "mark_tensor_parallel", "model_parallel_cuda_manual_seed",
    "partition_sizes", "plan_for", "reduce_from_tensor_model_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_model_parallel_region", "topology_from_mpu", "vocab_parallel_cross_entropy",
]
