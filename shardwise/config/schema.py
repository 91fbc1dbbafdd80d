"""ShardwiseConfig: the whole resolved ds_config as one typed, frozen object.

Attribute names are DeepSpeed's JSON key names (``cfg.zero_optimization.stage``, ``cfg.fp16.loss_scale``), so a
DeepSpeed user can read the code with the JSON open beside it. The batch triad is always resolved (three ints),
"auto" values have their defaults, and deprecated aliases are remapped; ``cfg.raw`` keeps what the user wrote.
Build one with ``shardwise.config.load_config``; never by hand (the loader does the checks).

Blocks for features shardwise only recognises (``OPAQUE_BLOCKS``) are kept as plain dicts: the support table
(``support.py``) decides whether they are inert or refused.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from .schema_base import AnyDict, Bool, Dtype, Float, PosFloat, PosInt, Section, Str, lowered
from .schema_comms import CommsConfig
from .schema_data import DataEfficiencyConfig, LegacyCurriculumConfig
from .schema_monitor import (
    AioConfig,
    AutotuningConfig,
    CometConfig,
    CommsLoggerConfig,
    CSVMonitorConfig,
    FlopsProfilerConfig,
    NebulaConfig,
    TensorBoardConfig,
    TimersConfig,
    TrackioConfig,
    WandbConfig,
)
from .schema_precision import AmpConfig, BF16Config, DataTypesConfig, FP16Config, TorchAutocastConfig
from .schema_training import (
    ActivationCheckpointingConfig,
    CheckpointConfig,
    CompileConfig,
    ElasticityConfig,
    HybridEngineConfig,
    OptimizerConfig,
    PipelineConfig,
    SchedulerConfig,
    TensorParallelConfig,
)
from .schema_zero import ZeroConfig

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")

# Top-level blocks of features DeepSpeed knows and shardwise does not implement; kept as plain dicts.
OPAQUE_BLOCKS = (
    "sparse_attention", "compression_training", "quantize_training", "eigenvalue", "progressive_layer_drop",
    "datastates_ckpt", "weight_quantization", "expert_parallel",
)


def _block(cls: type[Section]) -> Any:
    return Field(default_factory=cls)


class SectionsConfig(Section):
    """Every top-level key except the batch triad (validated before the triad is resolved)."""

    ds_strict: ClassVar[bool] = False  # DeepSpeed silently ignores unknown top-level keys

    # --- scalars -------------------------------------------------------------------------------------------
    steps_per_print: PosInt | None = None
    """Log progress every N optimizer steps; null or Infinity (accelerate writes ``float("inf")``) = never
    (DeepSpeed's docs say 10, its code None)."""

    @field_validator("steps_per_print", mode="before")
    @classmethod
    def _infinity_is_never(cls, value: Any) -> Any:
        if isinstance(value, float) and math.isinf(value) and value > 0:
            return None
        if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
            return None
        return value
    gradient_clipping: Float = 1.0
    """Clip the global gradient norm to this value; 0 = off. 1.0 in DeepSpeed 0.19 (0.0 in 0.14/0.16)."""
    check_grad_overflow: Bool | None = None
    """shardwise only: skip the optimizer step when the global gradient norm is inf/nan (no update, optimizer state
    untouched, LR schedule not advanced). null = each precision's default: fp16 always skips, bf16 follows
    bf16.check_grad_overflow (DeepSpeed 0.19, default true), fp32 applies the update as DeepSpeed does. true/false
    sets it for fp32 and bf16."""
    prescale_gradients: Bool = False
    """Divide gradients by the data-parallel size before the all-reduce instead of after."""
    gradient_predivide_factor: PosFloat = 1.0
    """Divide gradients by this factor before the all-reduce (and by dp/factor after)."""
    gradient_allreduce_op: lowered(Literal["mean", "sum"]) = "mean"
    """Average ("mean") or add ("sum") data-parallel gradients (DeepSpeed 0.19)."""
    communication_data_type: Dtype | None = None
    """Dtype of gradient collectives ("fp32", "fp16", "bf16"); null = the training dtype."""
    seq_parallel_communication_data_type: Dtype | None = "fp32"
    """Dtype of sequence-parallel collectives (older key: seq_parallel_comm_data_type)."""
    managed_gradient_accumulation: Bool = True
    """Let the engine count micro-steps; false makes every step() a boundary (DeepSpeed 0.19)."""
    wall_clock_breakdown: Bool = False
    """Time forward/backward/step with synchronised timers and log them every steps_per_print."""
    memory_breakdown: Bool = False
    """Log accelerator memory use at each logging step."""
    dump_state: Bool = False
    """Print the engine state after initialisation (debugging)."""
    disable_allgather: Bool = False
    """Legacy: broadcast instead of all-gather in ZeRO stage 1."""
    sparse_gradients: Bool = False
    """All-reduce embedding gradients as sparse tensors."""
    zero_allow_untested_optimizer: Bool = False
    """Allow ZeRO with an optimizer DeepSpeed has not tested."""
    zero_force_ds_cpu_optimizer: Bool = True
    """With ZeRO-Offload, refuse a client optimizer that is not a CPU optimizer."""
    dataloader_drop_last: Bool = False
    """The engine's data loader drops the last incomplete batch."""
    sequence_parallel_size: PosInt = 1
    """Ulysses sequence-parallel degree (part of the device mesh)."""
    data_parallel_size: PosInt | None = None
    """Data-parallel degree when building the device mesh; null = derived from the world size."""
    vocabulary_size: PosInt | None = None
    """Vocabulary size (only used for a tensor-core alignment warning)."""
    log_level: Str | None = None
    """Engine log level (DeepSpeed 0.19), e.g. "info"."""
    graph_harvesting: Bool = False
    """Capture CUDA graphs of the training step (DeepSpeed)."""
    use_data_before_expert_parallelism: Bool = False
    """MoE: order data-parallel before expert-parallel in the rank grid."""
    deterministic: Bool = False
    """shardwise only (Gaudi's DeepSpeed enforces it at initialisation): torch's deterministic algorithms on, so
    identical runs give identical bits (``engine/determinism.py``, docs/precision.md)."""

    # --- sections --------------------------------------------------------------------------------------------
    zero_optimization: ZeroConfig = _block(ZeroConfig)
    """ZeRO stage and settings."""
    fp16: FP16Config = _block(FP16Config)
    """float16 mixed precision."""
    bf16: BF16Config = _block(BF16Config)
    """bfloat16 mixed precision (key alias: bfloat16)."""
    amp: AmpConfig = _block(AmpConfig)
    """apex AMP."""
    torch_autocast: TorchAutocastConfig = _block(TorchAutocastConfig)
    """torch.autocast around the forward pass."""
    data_types: DataTypesConfig = _block(DataTypesConfig)
    """Gradient-accumulation, parameter and buffer dtypes."""
    optimizer: OptimizerConfig | None = None
    """Optimizer built by the engine; null when the script passes its own."""
    scheduler: SchedulerConfig | None = None
    """Learning-rate schedule built by the engine; null when none or the script passes its own."""
    activation_checkpointing: ActivationCheckpointingConfig = _block(ActivationCheckpointingConfig)
    """Activation checkpointing options."""
    pipeline: PipelineConfig = _block(PipelineConfig)
    """Pipeline-engine options."""
    checkpoint: CheckpointConfig = _block(CheckpointConfig)
    """Checkpoint save/load options."""
    comms_logger: CommsLoggerConfig = _block(CommsLoggerConfig)
    """Collective-communication logger."""
    comms_config: CommsConfig = _block(CommsConfig)
    """Collective settings (a shardwise key): the timeout."""
    tensor_parallel: TensorParallelConfig = _block(TensorParallelConfig)
    """AutoTP training."""
    flops_profiler: FlopsProfilerConfig = _block(FlopsProfilerConfig)
    """FLOPs profiler."""
    tensorboard: TensorBoardConfig = _block(TensorBoardConfig)
    """TensorBoard monitor."""
    wandb: WandbConfig = _block(WandbConfig)
    """Weights & Biases monitor."""
    csv_monitor: CSVMonitorConfig = _block(CSVMonitorConfig)
    """CSV monitor."""
    comet: CometConfig = _block(CometConfig)
    """Comet monitor."""
    trackio: TrackioConfig = _block(TrackioConfig)
    """Trackio monitor."""
    aio: AioConfig = _block(AioConfig)
    """Async I/O for NVMe offload."""
    elasticity: ElasticityConfig = _block(ElasticityConfig)
    """Elastic training."""
    autotuning: AutotuningConfig = _block(AutotuningConfig)
    """DeepSpeed autotuner settings."""
    hybrid_engine: HybridEngineConfig = _block(HybridEngineConfig)
    """DeepSpeed-Chat hybrid engine."""
    compile: CompileConfig = _block(CompileConfig)
    """torch.compile / DeepCompile options."""
    nebula: NebulaConfig = _block(NebulaConfig)
    """Nebula checkpoint service."""
    timers: TimersConfig = _block(TimersConfig)
    """Engine timers."""

    # --- recognised, not implemented (see support.py) --------------------------------------------------------
    sparse_attention: AnyDict | None = None
    """Sparse attention (removed in DeepSpeed 0.19.8)."""
    compression_training: AnyDict | None = None
    """Compression library: XTC, ZeroQuant, pruning (removed in DeepSpeed 0.19.8)."""
    quantize_training: AnyDict | None = None
    """MoQ quantize-aware training (removed in DeepSpeed 0.19.8)."""
    eigenvalue: AnyDict | None = None
    """Eigenvalue computation for MoQ (removed in DeepSpeed 0.19.8)."""
    progressive_layer_drop: AnyDict | None = None
    """Progressive layer drop (removed in DeepSpeed 0.19.8)."""
    curriculum_learning: LegacyCurriculumConfig | None = None
    """Legacy top-level curriculum learning (removed in DeepSpeed 0.19.8; shardwise keeps 0.19.6's behaviour)."""
    data_efficiency: DataEfficiencyConfig = _block(DataEfficiencyConfig)
    """Data efficiency library: curriculum data sampling, random-LTD routing (schema_data.py)."""
    datastates_ckpt: AnyDict | None = None
    """DataStates asynchronous checkpointing."""
    weight_quantization: AnyDict | None = None
    """Inference weight quantization."""
    expert_parallel: AnyDict | None = None
    """AutoEP expert parallelism (DeepSpeed 0.19)."""


class ShardwiseConfig(SectionsConfig):
    """A validated, fully resolved DeepSpeed-compatible config (frozen).

    Read values by DeepSpeed key name: ``cfg.train_batch_size``, ``cfg.zero_optimization.stage``,
    ``cfg.fp16.enabled``. ``cfg.raw`` is the dict the user wrote, ``cfg.auto_keys`` the dotted paths whose
    "auto" value was replaced by the default, ``cfg.warnings`` the warnings logged while loading, and
    ``cfg.to_dict()`` the resolved values as JSON-ready data (loadable again as a config).
    """

    train_batch_size: PosInt
    """Global batch per optimizer step = micro x accumulation x data-parallel size (resolved)."""
    train_micro_batch_size_per_gpu: PosInt
    """Samples per forward/backward on one rank (resolved)."""
    gradient_accumulation_steps: PosInt
    """Micro-batches accumulated per optimizer step (resolved)."""
    dp_world_size: PosInt = Field(default=1, exclude=True)
    """Data-parallel size the batch triad was resolved for."""
    raw: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)
    """The config exactly as the user gave it (parsed)."""
    auto_keys: tuple[str, ...] = Field(default=(), exclude=True)
    """Dotted paths whose value was "auto" and took the default."""
    warnings: tuple[str, ...] = Field(default=(), exclude=True, repr=False)
    """Human-readable warnings produced while loading (also logged to "shardwise.config")."""

    def written(self, key: str) -> bool:
        """Whether the user's config has the top-level ``key`` (for behaviour that only an explicit section turns
        on, such as ``activation_checkpointing`` configuring ``shardwise.checkpointing``)."""
        return key in self.raw

    def as_written(self) -> dict[str, Any]:
        """A JSON-safe copy of the config as the user wrote it (stored in checkpoints)."""
        return json.loads(json.dumps(self.raw, default=str))

    def to_dict(self) -> dict[str, Any]:
        """Every resolved value as JSON-serialisable data, batch triad first; valid input to load_config."""
        body = self.model_dump(mode="json")
        head = {key: body.pop(key) for key in BATCH_KEYS}
        return {**head, **body}

    # Read-only dict view by top-level key, for code written against DeepSpeed's ``engine.config`` (a dict there):
    # ``engine.config.get("zero_optimization", {}).get("stage")`` (Hugging Face Trainer). Values are resolved.
    def get(self, key: str, default: Any = None) -> Any:
        """The resolved value of top-level key ``key`` as plain data (``to_dict()[key]``), else ``default``."""
        return self.to_dict().get(key, default)

    def __getitem__(self, key: str) -> Any:
        data = self.to_dict()
        if key not in data:
            raise KeyError(key)
        return data[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def keys(self) -> list[str]:
        """The top-level keys of :meth:`to_dict`."""
        return list(self.to_dict())
