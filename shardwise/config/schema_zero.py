"""The ``zero_optimization`` block and its offload sub-blocks, with DeepSpeed 0.19's key names and defaults.

Attribute names are the JSON key names users write (``stage3_prefetch_bucket_size``, not DeepSpeed's internal
``prefetch_bucket_size``; the short names are accepted as aliases, as DeepSpeed's populate_by_name does).
``overlap_comm`` is resolved here, so readers (the engine included) always see the bool that runs: absent or null
means true at every stage (DeepSpeed's validator turns it on for stage 3 only; shardwise overlaps stages 1-2 too,
with identical results, see docs/zero.md).
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, model_validator

from .schema_base import (
    AnyDict,
    Bool,
    Device,
    Fraction,
    Int,
    NonNegInt,
    Section,
    Str,
    _to_int,
)


class OffloadParamConfig(Section):
    """``zero_optimization.offload_param``: move ZeRO-3 parameter shards to CPU or NVMe (stage 3 only)."""

    device: Device = "none"
    """Where partitioned parameters live between uses: "none" (accelerator), "cpu" or "nvme"."""
    nvme_path: Str | None = None
    """Directory on the NVMe device used when ``device`` is "nvme"."""
    buffer_count: NonNegInt = 5
    """Number of buffers in the pool used to swap parameters from NVMe."""
    buffer_size: NonNegInt = 100_000_000
    """Size (elements) of each NVMe swap buffer."""
    max_in_cpu: NonNegInt = 1_000_000_000
    """Parameter elements kept in CPU memory when offloading to NVMe."""
    pin_memory: Bool = True
    """Use page-locked CPU memory (faster copies, more host memory). True in DeepSpeed 0.19, false in 0.16."""


class OffloadOptimizerConfig(Section):
    """``zero_optimization.offload_optimizer``: keep optimizer state on CPU/NVMe and step on the CPU."""

    device: Device = "none"
    """Where optimizer state lives: "none" (accelerator), "cpu" or "nvme"."""
    nvme_path: Str | None = None
    """Directory on the NVMe device used when ``device`` is "nvme"."""
    buffer_count: NonNegInt = 4
    """Number of NVMe swap buffers; at least the number of per-parameter optimizer states (Adam: 4)."""
    pin_memory: Bool = True
    """Use page-locked CPU memory (faster copies, more host memory). True in DeepSpeed 0.19, false in 0.16."""
    pipeline_read: Bool = False
    """Overlap reading the next NVMe tile with the optimizer step on the current one."""
    pipeline_write: Bool = False
    """Overlap writing the previous NVMe tile with the optimizer step on the current one."""
    fast_init: Bool = False
    """Faster optimizer initialisation when offloading to NVMe."""
    ratio: Fraction = 1.0
    """Fraction of optimizer state offloaded (values below 1.0 are allowed only with ZeRO stage 3)."""
    super_offload: Bool = False
    """DeepSpeed's SuperOffload mode for superchips (stage 3 only)."""
    convert_grad_on_cpu: Bool = True
    """Convert gradients to the optimizer dtype on the CPU rather than on the accelerator."""
    cpuadam_cores_perc: Fraction = 0.8
    """Fraction of CPU cores the CPU optimizer may use (SuperOffload)."""


class LeafModuleConfig(Section):
    """``zero_optimization.leaf_module``: modules ZeRO-3 treats as one unit (no hooks inside them)."""

    classes: list[Str] = Field(default_factory=list)
    """Fully qualified class names treated as leaf modules."""
    names: list[Str] = Field(default_factory=list)
    """Module names (as in ``named_modules()``) treated as leaf modules."""
    name_suffixes: list[Str] = Field(default_factory=list)
    """Module-name suffixes treated as leaf modules."""

    @model_validator(mode="before")
    @classmethod
    def _single_strings_to_lists(cls, data: Any) -> Any:
        # DeepSpeed accepts "classes": "pkg.Block" as shorthand for a one-element list.
        if isinstance(data, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in data.items()}
        return data


def _stage_of(data: dict[str, Any]) -> int | None:
    try:
        return _to_int(data.get("stage", 0))
    except Exception:  # an invalid stage is reported by the field's own validation
        return None


class ZeroConfig(Section):
    """``zero_optimization``: ZeRO stage and its communication, bucketing, offload and ZeRO++ settings."""

    aliases: ClassVar[dict[str, str]] = {
        "prefetch_bucket_size": "stage3_prefetch_bucket_size",
        "param_persistence_threshold": "stage3_param_persistence_threshold",
        "model_persistence_threshold": "stage3_model_persistence_threshold",
        "max_live_parameters": "stage3_max_live_parameters",
        "max_reuse_distance": "stage3_max_reuse_distance",
        "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
        "module_granularity_threshold": "stage3_module_granularity_threshold",
        "use_all_reduce_for_fetch_params": "stage3_use_all_reduce_for_fetch_params",
        "allgather_sequential": "stage3_allgather_sequential",
        "partition_stream_chunk_size": "stage3_partition_stream_chunk_size",
    }
    deprecated: ClassVar[dict[str, str]] = {
        "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
    }

    stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(_to_int)] = 0
    """0 = off, 1 = shard optimizer state, 2 = + gradients, 3 = + parameters."""
    contiguous_gradients: Bool = True
    """Copy gradients into a contiguous buffer as they are produced (less fragmentation)."""
    reduce_scatter: Bool = True
    """Use reduce-scatter rather than all-reduce to average gradients."""
    reduce_bucket_size: NonNegInt = 500_000_000
    """Elements reduced per bucket."""
    use_multi_rank_bucket_allreduce: Bool = True
    """Combine the reduce buckets of several ranks into one all-reduce."""
    allgather_partitions: Bool = True
    """All-gather updated parameters (true) instead of a series of broadcasts."""
    allgather_bucket_size: NonNegInt = 500_000_000
    """Elements all-gathered per bucket."""
    overlap_comm: Bool = False
    """Overlap gradient reduction with the backward pass. Absent/null: true (every stage; DeepSpeed: stage 3 only)."""
    load_from_fp32_weights: Bool = True
    """Initialise fp32 master weights from the fp32 copies in a checkpoint (not the 16-bit ones)."""
    elastic_checkpoint: Bool = False
    """Legacy elastic checkpoints; no longer supported by DeepSpeed (use universal checkpoints)."""
    offload_param: OffloadParamConfig | None = None
    """Parameter offload (stage 3 only); null when absent."""
    offload_optimizer: OffloadOptimizerConfig | None = None
    """Optimizer-state offload (stages 1-3); null when absent."""
    zenflow: AnyDict | None = None
    """DeepSpeed ZenFlow settings (stall-free offload); null when absent."""
    sub_group_size: NonNegInt = 1_000_000_000
    """Elements per optimizer sub-group (tiling for ZeRO-3 offload)."""
    stage3_prefetch_bucket_size: NonNegInt = 50_000_000
    """Parameter elements prefetched ahead of use (5e7 in code; DeepSpeed's docs say 5e8)."""
    stage3_param_persistence_threshold: NonNegInt = 100_000
    """Parameters smaller than this many elements are not partitioned."""
    stage3_model_persistence_threshold: NonNegInt = sys.maxsize
    """Upper bound on the total unpartitioned (persistent) parameter elements."""
    stage3_max_live_parameters: NonNegInt = 1_000_000_000
    """Maximum gathered parameter elements resident per rank before releasing."""
    stage3_max_reuse_distance: NonNegInt = 1_000_000_000
    """Do not release a parameter that will be reused within this many elements."""
    stage3_gather_16bit_weights_on_model_save: Bool = False
    """Gather the full 16-bit weights when saving with ``save_16bit_model()``."""
    stage3_module_granularity_threshold: Int = 0
    """Modules finer than this are fetched as one unit (fewer hooks)."""
    stage3_use_all_reduce_for_fetch_params: Bool = False
    """Fetch parameters with all-reduce instead of all-gather."""
    stage3_allgather_sequential: Bool = False
    """All-gather parameters one by one, bypassing buckets (less peak memory)."""
    stage3_partition_stream_chunk_size: NonNegInt = 0
    """Stream very large parameters through chunks of this size while partitioning (0 = off)."""
    ignore_unused_parameters: Bool = True
    """Tolerate parameters that receive no gradient (dynamic networks)."""
    legacy_stage1: Bool = False
    """DeepSpeed's old stage-1 implementation."""
    round_robin_gradients: Bool = False
    """Stage 1/2 with CPU offload: spread gradient copies across ranks."""
    zero_hpz_partition_size: NonNegInt = 1
    """ZeRO++ hpZ: ranks in the secondary (usually intra-node) parameter partition group; 1 = off."""
    zero_quantized_weights: Bool = False
    """ZeRO++ qwZ: quantize weights for the all-gather."""
    zero_quantized_nontrainable_weights: Bool = False
    """Store frozen weights quantized (LoRA-style training)."""
    zero_quantized_gradients: Bool = False
    """ZeRO++ qgZ: quantized gradient reduce-scatter."""
    zeropp_loco_param: AnyDict | None = None
    """LoCo-ZeRO++ error-feedback settings ({"err_beta": 0.8, "reset_T": 1024}); null when off."""
    mics_shard_size: Int = -1
    """MiCS shard group size; -1 or 0 = off."""
    mics_hierarchical_params_gather: Bool = False
    """MiCS hierarchical all-gather."""
    memory_efficient_linear: Bool = True
    """Memory-efficient linear layer implementation under ZeRO-3."""
    pipeline_loading_checkpoint: Bool = False
    """Force checkpoint loading in pipeline mode (stage 3)."""
    override_module_apply: Bool = True
    """Wrap ``nn.Module.apply`` so it sees gathered parameters under ZeRO-3."""
    log_trace_cache_warnings: Bool = False
    """Log ZeRO-3 trace-cache invalidation warnings."""
    enable_sanity_checks: Bool = False
    """Internal consistency checks (debugging)."""
    save_muon_momentum_buffer_in_memory: Bool = False
    """With Muon and NVMe offload, keep the momentum buffer in memory."""
    leaf_module: LeafModuleConfig = Field(default_factory=LeafModuleConfig)
    """Modules ZeRO-3 treats as leaves."""

    @model_validator(mode="before")
    @classmethod
    def _resolve_overlap_comm(cls, data: Any) -> Any:
        # DeepSpeed: None means "true for stage 3, false otherwise"; shardwise overlaps at every stage (the
        # reductions are bucketed and asynchronous at no memory cost, and the results are identical)
        if isinstance(data, dict) and data.get("overlap_comm") is None:
            data = dict(data)
            data["overlap_comm"] = True
        return data

    def written_value(self, key: str) -> Any:
        """``key``'s value if the user wrote it, else None: for the sizes shardwise derives from the model when they
        are absent (``reduce_bucket_size``, ``stage3_prefetch_bucket_size``, ``stage3_max_live_parameters``,
        ``stage3_max_reuse_distance``, ``stage3_module_granularity_threshold``; see docs/zero.md)."""
        return getattr(self, key) if key in self.model_fields_set else None

    @property
    def offload_optimizer_device(self) -> str:
        """"cpu", "nvme" or "none" (also "none" when the block is absent)."""
        return self.offload_optimizer.device if self.offload_optimizer else "none"

    @property
    def offload_param_device(self) -> str:
        """"cpu", "nvme" or "none" (also "none" when the block is absent)."""
        return self.offload_param.device if self.offload_param else "none"
