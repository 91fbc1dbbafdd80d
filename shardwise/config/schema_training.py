"""Training-structure blocks: optimizer, scheduler, activation checkpointing, pipeline, checkpoint, tensor
parallel, elasticity, hybrid engine and compile.

Key names and defaults follow DeepSpeed 0.19. ``checkpoint.async_save`` is shardwise's own addition.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field

from .schema_base import (
    AnyDict,
    Bool,
    Dtype,
    Float,
    NonNegInt,
    PosInt,
    Section,
    Str,
    _fail,
    _to_int,
    uppered,
)


def _params(value: Any) -> Any:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail("a JSON object {...} of keyword arguments", 'write e.g. {"lr": 0.001}')
    return value


Params = Annotated[dict[str, Any], BeforeValidator(_params)]


class OptimizerConfig(Section):
    """``optimizer``: which optimizer the engine builds, and its constructor keyword arguments."""

    type: Str
    """Optimizer name: Adam, AdamW, SGD, Lamb, Adagrad, Lion, ... or any torch.optim class name."""
    params: Params = Field(default_factory=dict)
    """Keyword arguments for the optimizer (lr, betas, eps, weight_decay, torch_adam, adam_w_mode, ...)."""
    legacy_fusion: Bool = False
    """DeepSpeed's legacy fused fp16 optimizer path."""


class SchedulerConfig(Section):
    """``scheduler``: learning-rate schedule the engine builds, and its keyword arguments."""

    type: Str
    """Schedule name: WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest, or a torch one."""
    params: Params = Field(default_factory=dict)
    """Keyword arguments for the schedule (warmup_min_lr, warmup_max_lr, warmup_num_steps, ...)."""


class ActivationCheckpointingConfig(Section):
    """``activation_checkpointing``: how ``shardwise.checkpointing.checkpoint`` saves activations."""

    ds_strict: ClassVar[bool] = False

    partition_activations: Bool = False
    """Split checkpointed activations across tensor-parallel ranks."""
    cpu_checkpointing: Bool = False
    """Keep checkpointed activations in host (CPU) memory until recomputation."""
    contiguous_memory_optimization: Bool = False
    """Copy partitioned checkpointed activations into preallocated contiguous buffers (needs partition_activations)."""
    number_checkpoints: PosInt | None = None
    """Number of checkpoints the contiguous buffer is sized for."""
    synchronize_checkpoint_boundary: Bool = False
    """Synchronise the accelerator at each checkpoint boundary (profiling)."""
    profile: Bool = False
    """Time the forward/recompute of checkpointed functions."""


def _stages(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    value = _to_int(value)
    if value < 1:
        raise _fail('"auto" or a positive integer', 'use "auto" or the number of pipeline stages')
    return value


class PipelineConfig(Section):
    """``pipeline``: pipeline-engine options (the model's PipelineModule sets the stage count)."""

    ds_strict: ClassVar[bool] = False

    stages: Annotated[int | Literal["auto"], BeforeValidator(_stages)] = "auto"
    """Number of stages, or "auto" (taken from the PipelineModule)."""
    partition: Str = "best"
    """Partitioning hint kept for DeepSpeed compatibility (the PipelineModule's partition_method decides)."""
    seed_layers: Bool = False
    """Seed each layer's initialisation from its index."""
    activation_checkpoint_interval: NonNegInt = 0
    """Checkpoint activations every N layers (0 = off)."""
    pipe_partitioned: Bool = True
    """Split activations sent between stages across tensor-parallel ranks."""
    grad_partitioned: Bool = True
    """Split gradients sent between stages across tensor-parallel ranks."""
    use_reentrant: Bool = True
    """Use reentrant activation checkpointing inside pipeline stages."""


def _tag_mode(value: Any) -> Any:
    modes = {"ignore": "Ignore", "warn": "Warn", "fail": "Fail"}
    if isinstance(value, str) and value.strip().lower() in modes:
        return modes[value.strip().lower()]
    raise _fail('one of "Ignore", "Warn", "Fail"', 'write e.g. "tag_validation": "Warn"')


class ParallelWriteConfig(Section):
    """``checkpoint.parallel_write``."""

    ds_strict: ClassVar[bool] = False

    pipeline_stage: Bool = False
    """Each pipeline stage writes its own part of the checkpoint in parallel."""


class CheckpointWriterConfig(Section):
    """``checkpoint.writer`` (DeepSpeed 0.19): the I/O engine that writes checkpoint files."""

    ds_strict: ClassVar[bool] = False

    type: uppered(Literal["MOCK", "PYTHON", "FAST"]) = "FAST"
    """Writer implementation: "fast" (DeepSpeed's async I/O writer), "python" or "mock"."""
    io_buffer_size: PosInt = 64 * 1024 * 1024
    """Bytes per I/O buffer."""
    io_buffer_double: Bool = True
    """Double-buffer the writes."""
    io_multiplier: PosInt = 1
    """Multiplier on the I/O buffer count."""
    show_statistics: Bool = False
    """Print write throughput statistics."""
    data_parallel: uppered(Str) | None = None
    """Which data-parallel ranks write ("SOCKET", "MACHINE", ...); null = rank 0 only."""
    decoupled: Bool = False
    """Write from a separate process."""


class CheckpointConfig(Section):
    """``checkpoint``: tag validation, universal-checkpoint loading, parallel writes, async save."""

    ds_strict: ClassVar[bool] = False

    tag_validation: Annotated[Literal["Ignore", "Warn", "Fail"], BeforeValidator(_tag_mode)] = "Warn"
    """Check that every rank saves under the same tag: "Ignore", "Warn" or "Fail" (any letter case)."""
    load_universal: Bool = False
    """Load from a universal checkpoint (the ``latest_universal`` tag file)."""
    use_node_local_storage: Bool = False
    """Each node saves/loads its own copy on node-local storage."""
    parallel_write: ParallelWriteConfig = Field(default_factory=ParallelWriteConfig)
    """Parallel checkpoint writing options."""
    checkpoint_serialization: Bool = True
    """Use torch serialization for checkpoint files (DeepSpeed 0.19)."""
    writer: CheckpointWriterConfig | None = None
    """Checkpoint writer engine (DeepSpeed 0.19); null = default writer."""
    async_save: Bool = False
    """shardwise only: write checkpoint files in the background while training continues."""


class TPConfig(Section):
    """``tensor_parallel.tp``."""

    tp_size: PosInt = 1
    """Tensor-parallel degree."""
    tp_grain_size: PosInt = 1
    """Granularity (elements) of uneven MLP/lm_head splits."""


class TensorParallelConfig(Section):
    """``tensor_parallel``: DeepSpeed AutoTP training."""

    aliases: ClassVar[dict[str, str]] = {"tensor_parallel": "tp", "kernel_inject": "replace_with_kernel_inject"}

    autotp_size: NonNegInt = 0
    """AutoTP training degree; 0 = off."""
    tp: TPConfig = Field(default_factory=TPConfig)
    """Tensor-parallel group settings."""
    dtype: Dtype = "fp16"
    """Dtype the model is converted to by AutoTP."""
    keep_module_on_host: Bool = False
    """Keep loaded checkpoint weights on the host until sharded."""
    replace_with_kernel_inject: Bool = False
    """Inject DeepSpeed inference kernels (key alias: kernel_inject)."""
    tp_overlap_comm: Bool = False
    """Overlap the TP all-reduce with computation."""
    partition_config: AnyDict | None = None
    """Custom AutoTP layer partition rules."""
    preset_model: Str | None = None
    """Built-in AutoTP preset ("llama", "qwen2", ...)."""


class ElasticityConfig(Section):
    """``elasticity``: DeepSpeed elastic training (chooses the batch triad for a range of GPU counts)."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Let the elastic agent choose the batch sizes."""
    max_train_batch_size: PosInt = 2000
    """Largest acceptable global batch."""
    micro_batch_sizes: list[PosInt] = Field(default_factory=lambda: [2, 4, 6])
    """Candidate micro-batch sizes per GPU."""
    min_gpus: PosInt = 1
    """Smallest GPU count to support."""
    max_gpus: PosInt = 10000
    """Largest GPU count to support."""
    min_time: NonNegInt = 0
    """Minimum running time (minutes) before rescaling."""
    prefer_larger_batch: Bool = True
    """Prefer the larger batch when several fit."""
    version: Float = 0.2
    """Elasticity algorithm version."""
    ignore_non_elastic_batch_info: Bool = False
    """Ignore batch keys elsewhere in the config instead of refusing them."""
    num_gpus_per_node: PosInt = 1
    """GPUs per node (version 0.2)."""
    model_parallel_size: PosInt = 1
    """Model-parallel degree (version 0.2)."""


class HybridEngineConfig(Section):
    """``hybrid_engine``: DeepSpeed-Chat's train/generate hybrid engine."""

    enabled: Bool = False
    """Use the hybrid engine."""
    max_out_tokens: PosInt = 512
    """Generation workspace size."""
    inference_tp_size: PosInt = 1
    """Tensor-parallel degree during generation."""
    release_inference_cache: Bool = False
    """Free the inference workspace after generation."""
    pin_parameters: Bool = True
    """Pin gathered parameters during generation."""
    tp_gather_partition_size: PosInt = 8
    """Layers gathered at once when switching to generation."""


class CompileConfig(Section):
    """``compile``: DeepSpeed's torch.compile / DeepCompile options."""

    deepcompile: Bool = False
    """Turn on DeepCompile."""
    free_activation: Bool = False
    """Eagerly free activations (DeepCompile)."""
    free_activation_threshold: NonNegInt = 10 * 1024 * 1024
    """Byte threshold for eager freeing."""
    offload_activation: Bool = False
    """Offload saved activations to host memory (DeepCompile)."""
    offload_opt_states: Bool = False
    """Offload optimizer states during forward/backward (DeepCompile)."""
    double_buffer: Bool = True
    """Double-buffer parameter gathers (DeepCompile)."""
    symmetric_memory: Bool = False
    """Use symmetric memory (DeepCompile)."""
    debug_log: Bool = False
    """Dump graphs (DeepCompile)."""
    offload_parameters: Bool = False
    """Offload parameters (DeepCompile)."""
    sync_before_reduce: Bool = False
    """Synchronise before reductions (DeepCompile)."""
    sync_after_reduce: Bool = False
    """Synchronise after reductions (DeepCompile)."""
    sync_before_allgather: Bool = False
    """Synchronise before all-gathers (DeepCompile)."""
    sync_after_allgather: Bool = False
    """Synchronise after all-gathers (DeepCompile)."""
    keep_int_input_tensors: Bool = True
    """Keep real values of integer inputs when recording (DeepCompile)."""
    keep_all_input_tensors: Bool = False
    """Keep real values of every input when recording (DeepCompile)."""
    passes: list[Str] | None = None
    """DeepCompile passes to compose ("z1", "z3", "autosp")."""
