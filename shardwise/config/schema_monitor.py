"""Observability and tooling blocks: comms_logger, the monitors (tensorboard, wandb, csv_monitor, comet,
trackio), flops_profiler, autotuning, aio, nebula and timers. Key names and defaults follow DeepSpeed 0.19.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from .schema_base import AnyDict, Bool, Float, Int, NonNegFloat, NonNegInt, PosInt, Section, Str


class CommsLoggerConfig(Section):
    """``comms_logger``: log every collective (op, size, latency)."""

    enabled: Bool = False
    """Record collective calls."""
    verbose: Bool = False
    """Print every collective as it happens."""
    prof_all: Bool = True
    """Profile every collective (otherwise only those in ``prof_ops``)."""
    debug: Bool = False
    """Add the calling function to each record."""
    prof_ops: list[Str] = Field(default_factory=list)
    """Collective names to profile when ``prof_all`` is false."""


class TensorBoardConfig(Section):
    """``tensorboard``: write training metrics as TensorBoard events."""

    enabled: Bool = False
    """Write TensorBoard events."""
    output_path: Str = ""
    """Directory for the event files (default: under the launch directory)."""
    job_name: Str = "DeepSpeedJobName"
    """Sub-directory name for this job."""


class CSVMonitorConfig(Section):
    """``csv_monitor``: write training metrics to CSV files."""

    enabled: Bool = False
    """Write CSV files."""
    output_path: Str = ""
    """Directory for the CSV files (default: under the launch directory)."""
    job_name: Str = "DeepSpeedJobName"
    """Sub-directory name for this job."""


class WandbConfig(Section):
    """``wandb``: log training metrics to Weights & Biases."""

    enabled: Bool = False
    """Log to W&B."""
    group: Str | None = None
    """W&B run group."""
    team: Str | None = None
    """W&B team (entity)."""
    project: Str = "deepspeed"
    """W&B project."""


class CometConfig(Section):
    """``comet``: log training metrics to Comet."""

    enabled: Bool = False
    """Log to Comet."""
    samples_log_interval: PosInt = 100
    """Log every N samples."""
    project: Str | None = None
    """Comet project name."""
    workspace: Str | None = None
    """Comet workspace."""
    api_key: Str | None = None
    """Comet API key."""
    experiment_name: Str | None = None
    """Experiment name."""
    experiment_key: Str | None = None
    """Experiment key (to continue an experiment)."""
    online: Bool | None = None
    """Log online (true) or to an offline archive."""
    mode: Str | None = None
    """"get", "create" or "get_or_create"."""


class TrackioConfig(Section):
    """``trackio``: log training metrics to Trackio (DeepSpeed 0.19)."""

    enabled: Bool = False
    """Log to Trackio."""
    project: Str = "deepspeed"
    """Trackio project."""


class FlopsProfilerConfig(Section):
    """``flops_profiler``: profile the FLOPs, parameters and latency per module of one training step's forward
    (rank 0), and the step's achieved FLOP/s; the ``Train/Samples/elapsed_time_ms_*`` events are written too."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Run the profiler."""
    recompute_fwd_factor: Float = 0.0
    """Extra forward passes caused by activation recomputation (for the FLOP count)."""
    profile_step: PosInt = 1
    """Step at which to profile."""
    module_depth: Int = -1
    """Module depth of the report (-1 = all)."""
    top_modules: PosInt = 1
    """Number of top modules in the aggregated report."""
    detailed: Bool = True
    """Print the per-module breakdown."""
    output_file: Str | None = None
    """File for the report (null = stdout)."""
    peak_tflops: NonNegFloat | None = None
    """shardwise's own key: peak TFLOP/s of one device in the training dtype, for the report's MFU figure
    (achieved FLOP/s per device / peak); null leaves MFU out."""


class AutotuningConfig(Section):
    """``autotuning``: settings of DeepSpeed's separate autotuner (``deepspeed --autotuning``)."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Used by the DeepSpeed autotuner launcher; the training engine ignores it."""
    fast: Bool = True
    """Tune only the micro-batch size per ZeRO stage."""
    results_dir: Str = "autotuning_results"
    """Where results are written."""
    exps_dir: Str = "autotuning_exps"
    """Where experiment configs are written."""
    overwrite: Bool = True
    """Overwrite earlier results."""
    start_profile_step: NonNegInt = 3
    """First profiled step of each experiment."""
    end_profile_step: NonNegInt = 5
    """Last profiled step of each experiment."""
    metric_path: Str | None = None
    """File the metric is written to."""
    metric: Str = "throughput"
    """"throughput", "latency" or "flops"."""
    tuner_type: Str = "gridsearch"
    """"gridsearch", "random" or "model_based"."""
    tuner_early_stopping: PosInt = 5
    """Stop after this many experiments without improvement."""
    tuner_num_trials: PosInt = 50
    """Maximum experiments."""
    arg_mappings: AnyDict | None = None
    """Config key -> training-script argument names the tuner rewrites."""
    max_train_batch_size: PosInt | None = None
    """Largest global batch to try."""
    min_train_batch_size: PosInt = 1
    """Smallest global batch to try."""
    max_train_micro_batch_size_per_gpu: PosInt = 1024
    """Largest micro-batch to try."""
    min_train_micro_batch_size_per_gpu: PosInt = 1
    """Smallest micro-batch to try."""
    num_tuning_micro_batch_sizes: PosInt = 3
    """Micro-batch sizes tried per stage."""
    mp_size: PosInt = 1
    """Model-parallel degree of the job."""
    model_info_path: Str | None = None
    """File with model information (parameter count, ...)."""
    model_info: AnyDict | None = None
    """Model information given inline."""


class AioConfig(Section):
    """``aio``: asynchronous I/O settings for NVMe offload."""

    ds_strict: ClassVar[bool] = False
    deprecated: ClassVar[dict[str, str]] = {"thread_count": "intra_op_parallelism"}

    block_size: PosInt = 1_048_576
    """I/O block size in bytes."""
    queue_depth: PosInt = 8
    """I/O queue depth."""
    intra_op_parallelism: PosInt = 1
    """I/O threads per request (older key: thread_count)."""
    single_submit: Bool = False
    """Submit requests one at a time instead of in batches."""
    overlap_events: Bool = True
    """Overlap submission and completion events."""
    use_gds: Bool = False
    """Use NVIDIA GPUDirect Storage."""


class NebulaConfig(Section):
    """``nebula``: Azure Nebula checkpoint service."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Save checkpoints through Nebula."""
    persistent_storage_path: Str | None = None
    """Persistent storage directory."""
    persistent_time_interval: PosInt = 100
    """Seconds between persists."""
    num_of_version_in_retention: PosInt = 2
    """Checkpoint versions kept."""
    enable_nebula_load: Bool = True
    """Load through Nebula."""
    load_path: Str | None = None
    """Directory to load from."""


class ThroughputTimerConfig(Section):
    """``timers.throughput``."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = True
    """Measure samples/second."""
    synchronized: Bool = True
    """Synchronise the accelerator around the measurement."""


class TimersConfig(Section):
    """``timers``: built-in engine timers."""

    ds_strict: ClassVar[bool] = False

    throughput: ThroughputTimerConfig = Field(default_factory=ThroughputTimerConfig)
    """Throughput timer settings."""

