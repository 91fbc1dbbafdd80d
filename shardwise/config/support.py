"""THE table of what shardwise implements, checked after a config is parsed. Edit entries here as features land.

Every DeepSpeed key that would change behaviour has one line:
- SUPPORTED: implemented.
- HINT: accepted; a performance/memory knob that does not change results. shardwise may size or schedule
  things differently, so the value is a hint.
- WARN: accepted when active, with a warning saying what shardwise does instead (results unchanged).
- NOT_YET: accepted while inert (``inert(value)`` true: disabled, default), with a warning when the key is
  present; otherwise ConfigError "<path> = <value> is not supported yet by shardwise (<note>)".
- REMOVED: like NOT_YET, for features DeepSpeed 0.19.8 itself removed (it refuses them too).
Nothing DeepSpeed knows is silently ignored. ``markdown_table()`` renders the table for docs/config.md.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from .errors import KIND_REMOVED, KIND_UNSUPPORTED, Problem, show


class Status(str, enum.Enum):
    """How shardwise treats a DeepSpeed feature (see the module docstring)."""

    SUPPORTED = "supported"
    HINT = "hint"
    WARN = "accepted, warns"
    NOT_YET = "not yet"
    REMOVED = "removed"


S, H, W, N, R = Status.SUPPORTED, Status.HINT, Status.WARN, Status.NOT_YET, Status.REMOVED


@dataclass(frozen=True)
class Inert:
    """A named predicate: the values for which a feature stays off."""

    test: Callable[[Any], bool]
    text: str
    fix: str = "remove it"

    def __call__(self, value: Any) -> bool:
        return bool(self.test(value))


def _on(value: Any) -> bool:
    return value is True or value == 1 or (isinstance(value, str) and value.strip().lower() == "true")


def _block_inactive(block: Any) -> bool:
    """A recognised-only block is inactive when absent/empty, or when its "enabled" switches are off."""
    if not block:
        return True
    if not isinstance(block, dict):
        return False
    if "enabled" in block:
        return not _on(block["enabled"])
    flags = list(_nested_enabled(block))
    return bool(flags) and not any(_on(flag) for flag in flags)


def _nested_enabled(node: Any) -> Iterable[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "enabled":
                yield value
            else:
                yield from _nested_enabled(value)
    elif isinstance(node, list):
        for item in node:
            yield from _nested_enabled(item)


SUPPORTED_OPTIMIZERS = ("adam", "adamw", "sgd", "lamb", "adagrad", "lion", "muon")  # case-insensitive
ONE_BIT_OPTIMIZERS = ("onebitadam", "zerooneadam", "onebitlamb")  # removed in DeepSpeed 0.19.8
DS_SCHEDULERS = ("LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


@lru_cache(maxsize=1)
def _torch_names(module: str, base: str) -> frozenset[str]:
    """Class names in torch.optim / torch.optim.lr_scheduler (torch imported only when a config needs it)."""
    try:
        import importlib

        mod = importlib.import_module(module)
        root = getattr(mod, base)
    except (ImportError, AttributeError):
        return frozenset()
    return frozenset(n for n, v in vars(mod).items() if isinstance(v, type) and issubclass(v, root))


def _optimizer_ok(name: Any) -> bool:
    return (not isinstance(name, str) or name.lower() in SUPPORTED_OPTIMIZERS + ONE_BIT_OPTIMIZERS
            or name in _torch_names("torch.optim", "Optimizer"))


def _scheduler_ok(name: Any) -> bool:
    return (not isinstance(name, str) or name in DS_SCHEDULERS
            or name in _torch_names("torch.optim.lr_scheduler", "LRScheduler"))


OFF = Inert(lambda v: not _on(v), "false", "set it to false (or remove it)")
NULL = Inert(lambda v: v is None, "null/absent", "remove it")
INACTIVE = Inert(_block_inactive, 'absent, or its "enabled" false',
                  'remove the block (or set its "enabled" to false)')
ANY = Inert(lambda v: True, "any")
TP_OFF = Inert(lambda v: v <= 1, "0 or 1", "set it to 1 (or remove it)")
MICS_OFF = Inert(lambda v: v <= 0, "-1 or 0", "remove it")
MEAN = Inert(lambda v: v == "mean", '"mean"', 'use "mean" (or remove it)')
TRUE = Inert(lambda v: v is True, "true", "set it to true (or remove it)")
FP32_OR_NULL = Inert(lambda v: v in (None, "fp32"), 'null or "fp32"', 'use "fp32" (or remove it)')
FULL_RATIO = Inert(lambda v: v >= 1.0, "1.0")
COMPILE_DEFAULTS = Inert(lambda v: v == type(v)(), "all defaults", "remove the block")
NOT_ONE_BIT = Inert(lambda v: not (isinstance(v, str) and v.lower() in ONE_BIT_OPTIMIZERS), "not 1-bit",
                    'use "type": "Adam" or "AdamW" (communication_data_type "bf16" halves the traffic)')
KNOWN_OPTIMIZER = Inert(_optimizer_ok, "Adam, AdamW, SGD, Lamb, Adagrad, Lion, Muon or a torch.optim class",
                        'use one of those, or pass your own optimizer to initialize(optimizer=...)')
KNOWN_SCHEDULER = Inert(_scheduler_ok, ", ".join(DS_SCHEDULERS) + " or a torch.optim.lr_scheduler class",
                        'use one of those, or pass your own to initialize(lr_scheduler=...)')


@dataclass(frozen=True)
class Feature:
    """One row: a dotted config path, its status, which values keep it inert, and a note for the user."""

    path: str
    status: Status
    inert: Inert = ANY
    note: str = ""


# Notes too long for a table line.
_ONE_BIT = "the 1-bit optimizers (1-bit Adam, 0/1 Adam, 1-bit LAMB)"
_OPTIMIZERS = "supported: Adam, AdamW, SGD, Lamb, Adagrad, Lion, Muon and any torch.optim class name"
_SCHEDULERS = "supported: " + ", ".join(DS_SCHEDULERS) + " and torch.optim.lr_scheduler classes"
_AUTOTUNER = ("it only drives DeepSpeed's separate autotuner (deepspeed --autotuning), which shardwise does not "
              "run; training proceeds with the config as written")
_RATIO = ("partial offload: shardwise offloads all optimizer state (ratio 1.0); results are identical, host memory "
          "use is higher")
_ELASTIC_CKPT = "DeepSpeed no longer supports it either; shardwise checkpoints load at any data-parallel size"
_COMPRESSION = "its compression library (XTC, ZeroQuant, pruning, layer reduction)"
_CURRICULUM = ("DeepSpeed 0.19.8 removed this legacy block (it refuses it); shardwise runs it as DeepSpeed 0.19.6 did "
               "(forward gets curriculum_seqlen). Prefer data_efficiency.data_sampling.curriculum_learning")
LEGACY_OFF = Inert(lambda v: v is None or not getattr(v, "enabled", False), "absent, or its \"enabled\" false")
FEATURES: tuple[Feature, ...] = (
    # --- implemented (planned by the engine owners; flip to NOT_YET if a feature is dropped) ---------------
    Feature("zero_optimization.stage", S, note="ZeRO stages 0, 1, 2, 3"),  # zero/flat_strategy.py, zero/stage3/
    Feature("fp16", S, note="dynamic or static loss scaling, auto_cast"),  # engine/precision.py
    Feature("bf16", S, note="including check_grad_overflow"),  # engine/precision.py
    Feature("fp16.fp16_master_weights_and_grads", S, note="ZeRO 1-3 with CPU offload (fp32 optimizer states), "
            "as DeepSpeed"),  # zero/policy.py
    Feature("bf16.bf16_master_weights_and_grads", S, note="ZeRO 1-3; without bf16_optimizer_states only with CPU "
            "offload, as DeepSpeed"),  # zero/policy.py
    Feature("bf16.bf16_optimizer_states", S, note="ZeRO 1-3, with bf16_master_weights_and_grads"),  # zero/policy.py
    Feature("torch_autocast", S, note="enabled, dtype, lower_precision_safe_modules (validated; gradients reduced "
            "in their own dtype); every ZeRO stage and the pipeline"),  # engine/autocast.py
    Feature("zero_optimization.offload_optimizer.device", S, note='"cpu" and "nvme"'),  # zero/optimizer_offload.py
    Feature("zero_optimization.offload_param.device", S, note='"cpu" and "nvme" (stage 3)'),  # zero/param_offload.py
    Feature("zero_optimization.zero_hpz_partition_size", S, note="ZeRO++ hpZ"),  # zero/shard_comm.py
    Feature("zero_optimization.zero_quantized_weights", S, note="ZeRO++ qwZ"),  # zero/shard_comm.py, zero/quantize.py
    Feature("zero_optimization.zero_quantized_gradients", S, note="ZeRO++ qgZ"),  # zero/shard_comm.py, zero/quantize.py
    Feature("zero_optimization.stage3_gather_16bit_weights_on_model_save", S),  # save_16bit_model
    Feature("pipeline", S,  # pipe/
            note="PipelineModule; 1F1B and interleaved 1F1B (virtual_stages); pipe/grad_partitioned; ZeRO-0/1 only"),
    Feature("activation_checkpointing", S),  # activation_checkpointing/
    Feature("comms_logger", S),  # comm/
    Feature("comms_config.timeout", S, note="shardwise's own key"),  # comm/timeouts.py, via initialize()
    Feature("csv_monitor", S, note="DeepSpeed's layout: output_path/job_name/<event>.csv"),  # monitor/
    Feature("tensorboard", S, note="needs the tensorboard package (shardwise[tensorboard])"),  # monitor/
    Feature("wandb", S, note="needs the wandb package (shardwise[wandb])"),  # monitor/
    Feature("comet", S, note="needs comet_ml >= 3.41 (shardwise[comet])"),  # monitor/
    Feature("trackio", S, note="needs the trackio package (shardwise[trackio])"),  # monitor/
    Feature("flops_profiler", S, note="FLOPs from torch.utils.flop_counter; MFU with peak_tflops"),  # profiling/
    Feature("wall_clock_breakdown", S),  # utils/timers.py
    Feature("memory_breakdown", S),  # engine
    Feature("communication_data_type", S, note='"fp32", "fp16", "bf16"'),  # zero/reducer.py, zero/stage3/reduce.py
    Feature("gradient_clipping", S),  # engine
    Feature("check_grad_overflow", S, note="shardwise's own key: skip inf/nan steps in fp32 and bf16"),  # engine
    Feature("deterministic", S, note="shardwise's own key: torch's deterministic algorithms; identical runs give "
            "identical bits"),  # engine/determinism.py
    Feature("zero_optimization.ignore_unused_parameters", S,  # engine/guards.py
            note="false: ZeRO-1/2 with optimizer offload raises on every rank when a parameter gets no gradient"),
    Feature("optimizer.type", N, KNOWN_OPTIMIZER, _OPTIMIZERS),  # engine/optimizers.py
    Feature("scheduler.type", N, KNOWN_SCHEDULER, _SCHEDULERS),  # engine/lr_schedules.py
    Feature("checkpoint.tag_validation", S),  # checkpoint/engine.py
    Feature("checkpoint.async_save", S, note="shardwise's own key"),  # checkpoint/engine.py
    Feature("checkpoint.load_universal", S,  # checkpoint/files.py: every checkpoint loads at any layout
            note="every shardwise checkpoint is universal; the tag comes from latest_universal, else latest"),
    Feature("dataloader_drop_last", S),  # engine/dataloader.py
    Feature("sequence_parallel_size", S, note="Ulysses"),  # sp/ + comm/topology.py
    Feature("data_efficiency.data_sampling.curriculum_learning", S,  # data/sampler.py, data/loader.py
            note="schedules fixed_linear, fixed_root, fixed_discrete, custom; value/percentile metrics; "
                 "seqlen_truncate"),
    Feature("data_efficiency.data_routing.random_ltd", S, note="convert_to_random_ltd; fixed_linear"),  # data/
    Feature("data_parallel_size", S),  # comm/topology.py
    Feature("steps_per_print", S),  # engine
    # --- performance hints: accepted, results unchanged --------------------------------------------------
    Feature("zero_optimization.reduce_bucket_size", H),  # bucket sizing
    Feature("zero_optimization.allgather_bucket_size", H),  # bucket sizing
    Feature("zero_optimization.overlap_comm", H),  # scheduling only
    Feature("zero_optimization.contiguous_gradients", H),  # memory layout only
    Feature("zero_optimization.reduce_scatter", H),  # collective choice only
    Feature("zero_optimization.allgather_partitions", H),  # collective choice only
    Feature("zero_optimization.use_multi_rank_bucket_allreduce", H),  # collective choice only
    Feature("zero_optimization.round_robin_gradients", H),  # copy scheduling only
    Feature("zero_optimization.sub_group_size", H),  # tiling only
    Feature("zero_optimization.stage3_prefetch_bucket_size", H),  # prefetch depth
    Feature("zero_optimization.stage3_param_persistence_threshold", H),  # which params stay gathered
    Feature("zero_optimization.stage3_model_persistence_threshold", H),  # which params stay gathered
    Feature("zero_optimization.stage3_max_live_parameters", H),  # release policy
    Feature("zero_optimization.stage3_max_reuse_distance", H),  # release policy
    Feature("zero_optimization.stage3_module_granularity_threshold", H),  # hook granularity
    Feature("zero_optimization.stage3_use_all_reduce_for_fetch_params", H),  # collective choice
    Feature("zero_optimization.stage3_allgather_sequential", H),  # collective scheduling
    Feature("zero_optimization.stage3_partition_stream_chunk_size", H),  # partitioning memory
    Feature("zero_optimization.load_from_fp32_weights", H),  # our checkpoints always hold fp32 masters
    Feature("zero_optimization.memory_efficient_linear", H),  # memory only
    Feature("zero_optimization.override_module_apply", H),  # module.apply sees gathered params
    Feature("zero_optimization.pipeline_loading_checkpoint", H),  # loading path
    Feature("zero_optimization.leaf_module", H),  # hook granularity
    Feature("zero_optimization.log_trace_cache_warnings", H),  # logging
    Feature("zero_optimization.enable_sanity_checks", H),  # debugging
    Feature("zero_optimization.save_muon_momentum_buffer_in_memory", H),  # Muon + NVMe only
    Feature("zero_optimization.offload_optimizer.pin_memory", H),  # host memory kind
    Feature("zero_optimization.offload_param.pin_memory", H),  # host memory kind
    Feature("zero_optimization.offload_optimizer.fast_init", H),  # NVMe init speed
    Feature("zero_optimization.offload_optimizer.pipeline_read", H),  # NVMe overlap
    Feature("zero_optimization.offload_optimizer.pipeline_write", H),  # NVMe overlap
    Feature("aio", H, note="NVMe I/O tuning"),  # zero/param_offload.py, zero/optimizer_offload.py
    Feature("prescale_gradients", H, note="same average, different rounding order"),  # comm
    Feature("gradient_predivide_factor", H, note="same average, different rounding order"),  # comm
    Feature("disable_allgather", H),  # collective choice
    Feature("bf16.immediate_grad_update", H),  # accumulation timing
    Feature("checkpoint.parallel_write", H),  # I/O scheduling
    Feature("checkpoint.checkpoint_serialization", H),  # file writer detail
    Feature("checkpoint.writer", H),  # file writer engine
    Feature("timers", H),  # throughput timer
    Feature("vocabulary_size", H, note="alignment warning only"),  # engine
    Feature("log_level", H),  # logging
    # --- accepted with a warning ---------------------------------------------------------------------------
    Feature("autotuning.enabled", W, OFF, _AUTOTUNER),  # only read by `deepspeed --autotuning`
    Feature("zero_optimization.offload_optimizer.ratio", W, FULL_RATIO, _RATIO),  # Twin-Flow partial offload
    Feature("zero_optimization.offload_optimizer.super_offload", W, OFF, "treated as plain CPU offload"),  # perf
    Feature("zero_optimization.elastic_checkpoint", W, OFF, _ELASTIC_CKPT),  # DeepSpeed only warns too
    Feature("dump_state", W, OFF, "no DeepSpeed state dump; the engine logs its setup"),  # debugging aid
    Feature("curriculum_learning", W, LEGACY_OFF, _CURRICULUM),  # data/curriculum.py; successor: data_efficiency
    # --- not supported yet ---------------------------------------------------------------------------------
    Feature("amp.enabled", N, OFF, 'apex AMP; use the "bf16" or "fp16" block instead'),  # apex is not a dep
    Feature("elasticity.enabled", N, OFF, "set the batch keys for your data-parallel size"),  # elastic agent
    Feature("data_efficiency.data_sampling.dynamic_batching", N, INACTIVE,  # data/
            "variable batch size and LR scaling (DeepSpeed's separate helper functions)"),
    Feature("data_efficiency.data_routing.random_ltd.layer_token_lr_schedule", N, INACTIVE,  # data/random_ltd.py
            "random-LTD's layer-token LR schedule; DeepSpeed 0.19 raises NotImplementedError for it too"),
    Feature("hybrid_engine.enabled", N, OFF, "DeepSpeed-Chat's hybrid engine"),  # RLHF engine
    Feature("compile", N, COMPILE_DEFAULTS, "DeepCompile; call torch.compile on the model yourself"),  # compiler
    Feature("nebula.enabled", N, OFF, "Azure Nebula; use checkpoint.async_save"),  # checkpoint service
    Feature("datastates_ckpt", N, INACTIVE, "DataStates; use checkpoint.async_save"),  # checkpoint service
    Feature("weight_quantization", N, INACTIVE, "inference weight quantization"),  # inference
    Feature("expert_parallel", N, INACTIVE, "AutoEP / MoE expert parallelism"),  # MoE
    Feature("use_data_before_expert_parallelism", N, OFF, "MoE rank ordering"),  # MoE
    Feature("sparse_gradients", N, OFF, "sparse embedding-gradient all-reduce"),  # comm
    Feature("graph_harvesting", N, OFF, "CUDA-graph capture of the training step"),  # engine
    Feature("managed_gradient_accumulation", N, TRUE, "unmanaged accumulation"),  # engine boundary logic
    Feature("gradient_allreduce_op", N, MEAN, "summed data-parallel gradients"),  # comm
    Feature("seq_parallel_communication_data_type", N, FP32_OR_NULL, "16-bit sequence-parallel comm"),  # sp/
    Feature("data_types.grad_accum_dtype", S, note='"fp32", "fp16", "bf16"'),  # zero/policy.py
    Feature("data_types.param_dtype", N, NULL, "convert the model's dtype yourself"),  # precision
    Feature("data_types.buffer_dtype", N, NULL, "convert the buffers' dtype yourself"),  # precision
    Feature("zero_optimization.mics_shard_size", N, MICS_OFF, "MiCS; use zero_hpz_partition_size"),  # zero
    Feature("zero_optimization.mics_hierarchical_params_gather", N, OFF, "MiCS"),  # zero
    Feature("zero_optimization.zenflow", N, NULL, "ZenFlow; use offload_optimizer"),  # zero
    Feature("zero_optimization.zeropp_loco_param", N, NULL, "LoCo-ZeRO++"),  # zero
    Feature("zero_optimization.zero_quantized_nontrainable_weights", N, OFF, "quantized frozen weights"),  # zero
    Feature("zero_optimization.legacy_stage1", N, OFF, "DeepSpeed's old stage 1; use stage 1"),  # zero
    Feature("tensor_parallel.autotp_size", S, note="AutoTP training of HF models, with ZeRO 0-2"),  # tp/autotp.py
    Feature("tensor_parallel.tp.tp_grain_size", S, note="grain of AutoTP's MLP splits"),  # tp/autotp.py
    Feature("tensor_parallel.tp_overlap_comm", H),  # scheduling only
    Feature("tensor_parallel.preset_model", W, NULL,
            "the AutoTP plan follows the model's config (base_model_tp_plan, else model_type)"),  # tp/resolve.py
    Feature("tensor_parallel.partition_config", N, NULL,
            "custom AutoTP partition rules; set config.base_model_tp_plan on the model"),  # tp/resolve.py
    Feature("tensor_parallel.tp.tp_size", N, TP_OFF, "a training tp group size; use autotp_size"),  # tp/
    Feature("tensor_parallel.replace_with_kernel_inject", N, OFF, "DeepSpeed inference kernels"),  # inference
    Feature("checkpoint.use_node_local_storage", N, OFF, "save to shared storage"),  # checkpoint/
    # --- removed by DeepSpeed 0.19.8 itself ---------------------------------------------------------------
    Feature("compression_training", R, INACTIVE, _COMPRESSION),  # XTC, ZeroQuant
    Feature("quantize_training", R, INACTIVE, "MoQ (Mixture-of-Quantization)"),  # MoQ
    Feature("eigenvalue", R, INACTIVE, "MoQ's eigenvalue schedule"),  # MoQ
    Feature("progressive_layer_drop", R, INACTIVE, "Progressive Layer Drop"),  # PLD
    Feature("sparse_attention", R, INACTIVE, "Sparse Attention"),  # Triton block-sparse kernels
    Feature("optimizer.type", R, NOT_ONE_BIT, _ONE_BIT),  # OneBitAdam, ZeroOneAdam, OneBitLamb
)


#: ``init_inference`` keys shardwise refuses when active (the inference config's part of this table): (key, whether
#: the validated inference config uses it, the fix). Checked by ``inference/config.py``'s loader.
INFERENCE_FEATURES_REFUSED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("use_triton", lambda c: c.use_triton, "Triton inference kernels are not implemented; remove use_triton"),
    ("quant", lambda c: bool(c.quant.get("enabled", False)) if c.quant else False,
     "MoQ quantization is not implemented; remove quant or set enabled false"),
    ("zero", lambda c: int(c.zero.get("stage", 0) or 0) > 0 if c.zero else False,
     "ZeRO-Inference is not implemented; split the model with tensor_parallel.tp_size instead"),
    ("save_mp_checkpoint_path", lambda c: bool(c.save_mp_checkpoint_path),
     "saving a re-sharded checkpoint is not implemented; shardwise reads the full checkpoint per rank directly"),
)


_MISSING = object()


def _lookup(node: Any, path: str) -> Any:
    for part in path.split("."):
        if node is None or node is _MISSING:
            return _MISSING
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        elif isinstance(node, BaseModel):
            node = getattr(node, part, _MISSING)
        else:
            return _MISSING
    return node


def _given(data: dict[str, Any], path: str) -> bool:
    """True when the user wrote ``path`` (or, for ``X.enabled``, the block X) with a non-null value."""
    if _lookup(data, path) not in (_MISSING, None):
        return True
    return path.endswith(".enabled") and _lookup(data, path.rsplit(".", 1)[0]) not in (_MISSING, None)


def _is_switch(feat: Feature) -> bool:
    """Whether the feature is a whole block that can be present but switched off (worth a warning)."""
    return feat.inert is INACTIVE or (feat.inert is OFF and feat.path.endswith(".enabled"))


def _subject(path: str, value: Any) -> str:
    return f"the '{path}' block" if isinstance(value, (dict, BaseModel)) else f"{path} = {show(value)}"


def check_support(cfg: Any, given: dict[str, Any]) -> tuple[list[Problem], list[str]]:
    """Apply FEATURES to the typed sections ``cfg``; ``given`` is the user's (normalised) dict, used to warn
    about inert blocks the user wrote. Returns (problems, warnings)."""
    problems: list[Problem] = []
    warnings: list[str] = []
    for feat in FEATURES:
        if feat.status in (S, H):
            continue
        value = _lookup(cfg, feat.path)
        if value is _MISSING:
            continue
        if feat.inert(value):
            if feat.status in (N, R) and _is_switch(feat) and _given(given, feat.path):
                why = (f"DeepSpeed 0.19.8 removed {feat.note}" if feat.status is R
                       else f"shardwise does not support it yet ({feat.note})")
                warnings.append(f"{feat.path}: present but inactive, so accepted; {why}, so enabling it would be "
                                "refused.")
            continue
        if feat.status is W:
            warnings.append(f"{_subject(feat.path, value)}: accepted, but {feat.note}.")
        elif feat.status is N:
            problems.append(Problem(feat.path, f"{_subject(feat.path, value)} is not supported yet by shardwise "
                                    f"({feat.note}). Fix: {feat.inert.fix}.", KIND_UNSUPPORTED))
        else:
            problems.append(Problem(feat.path, f"{_subject(feat.path, value)}: DeepSpeed 0.19.8 itself removed "
                                    f"{feat.note} and refuses this config too; shardwise does not implement it "
                                    f"either. Fix: {feat.inert.fix}.", KIND_REMOVED))
    return problems, warnings


def markdown_table() -> str:
    """FEATURES as a Markdown table (for docs/config.md)."""
    rows = ["| key | status | accepted when | note |", "|---|---|---|---|"]
    for f in FEATURES:
        when = f.inert.text if f.status in (N, R) else "always"
        rows.append(f"| `{f.path}` | {f.status.value} | {when} | {f.note} |")
    return "\n".join(rows)
