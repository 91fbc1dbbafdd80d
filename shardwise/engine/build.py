"""``build_engine``: apply precision, parallelism and the optimizer to a model, in one fixed, commented order.

Order (each step assumes the previous ones):
1. determinism switches; cast the model to its training dtype and move it to this rank's device;
2. build the basic optimizer (client object, client callable, or the config's ``optimizer`` section);
3. ``apply_parallelism``: the one place the parallel layouts are applied, in the order its docstring gives
   (tensor plan -> pipeline split -> activation checkpointing -> ZeRO -> offload, then one starting point);
4. LR schedule (client object, client callable on the basic optimizer, or the config's ``scheduler``);
5. the training data loader; then the ``Engine`` (or the pipeline engine) around all of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from shardwise import comm
from shardwise.accelerator import get_accelerator
from shardwise.comm.topology import Topology
from shardwise.config import ConfigError, ShardwiseConfig, ZeroConfig
from shardwise.config.errors import show
from shardwise.engine.dataloader import build_training_loader
from shardwise.engine.determinism import enable_deterministic
from shardwise.engine.engine import Engine, _log_build
from shardwise.engine.lr_schedules import build_scheduler
from shardwise.engine.optimizers import build_optimizer, is_zero_supported_optimizer
from shardwise.engine.precision import make_scaler, model_dtype
from shardwise.engine.strategy import ShardingStrategy
from shardwise.zero.flat_strategy import FlatStrategy
from shardwise.zero.policy import default_bucket_numel, make_policy
from shardwise.zero.shard_comm import HierarchicalShardComm, ShardComm
from shardwise.zero.stage3 import Stage3Strategy


class EngineBuildError(ValueError):
    """The model, optimizer and config cannot be combined; the message says how to fix it."""


def build_engine(*, module: nn.Module, config: ShardwiseConfig, topology: Topology, optimizer: Any = None,
                 model_parameters: Iterable | None = None, lr_scheduler: Any = None, training_data: Any = None,
                 collate_fn: Callable | None = None, engine_cls: type[Engine] = Engine,
                 default_grad_accum_dtype: str | None = None) -> Engine:
    """Assemble an ``Engine`` (or ``engine_cls``, e.g. the pipeline engine; see the module docstring).

    ``default_grad_accum_dtype`` applies when the config leaves ``data_types.grad_accum_dtype`` unset (the pipeline
    engine passes ``"fp32"``: bf16 pipelines use the BF16 optimizer, as in DeepSpeed).
    """
    enable_deterministic(config)  # "deterministic": true (engine/determinism.py)
    _cast_and_place(module, model_dtype(config))
    basic = _build_basic_optimizer(module, config, optimizer, model_parameters)
    strategy = apply_parallelism(module, config, topology, basic, default_grad_accum_dtype)
    scheduler = _build_scheduler(config, lr_scheduler, basic)
    loader = None
    if training_data is not None:
        loader = build_training_loader(training_data, config, topology.size("dp"), topology.coord("dp"), collate_fn)
    engine = engine_cls(module=module, config=config, topology=topology, strategy=strategy, scaler=make_scaler(config),
                    lr_scheduler=scheduler, training_dataloader=loader)
    _log_build(engine)
    return engine


def apply_parallelism(module: nn.Module, config: ShardwiseConfig, topology: Topology,
                      basic: torch.optim.Optimizer | None, default_grad_accum_dtype: str | None = None
                      ) -> ShardingStrategy | None:
    """Apply every parallel layout to ``module`` (already cast and placed), in this order; returns the strategy.

    1. Tensor-parallel plan: done before the engine exists, so every later step sees only this rank's pieces:
       AutoTP training (``tensor_parallel.autotp_size``) splits a Hugging Face model in ``api.initialize``
       (``tp/autotp.py``), and Megatron-style models are built from ``tp/`` layers with a topology.
    2. Pipeline split: also done before, by constructing a ``PipelineModule`` (``pipe/module.py``), which holds
       only this stage's layers; the pipeline engine (``pipe/engine.py``) is built through this same path.
    3. Activation checkpointing: a config ``activation_checkpointing`` section configures ``shardwise.checkpointing``
       for this topology (partitions over the tensor group), unless the script configured it itself.
    4. ZeRO: the sharding strategy takes the model's trainable parameters and the optimizer: flat buffers (stages
       0-2) or units with shards (stage 3), fp32 masters, gradient hooks (``engine/strategy.py``).
    5. Offload: part of the ZeRO policy; the strategy puts optimizer states (and, at stage 3, parameter shards) on
       the host or NVMe as it allocates them.
    Last, every data-parallel replica starts from the weights of its ZeRO group's first rank, and an optimizer that
    needs to know where its matrices' pieces lie (Muon) is told.
    """
    _configure_activation_checkpointing(config, topology)
    strategy = _build_strategy(module, config, topology, basic, default_grad_accum_dtype) if basic is not None else None
    if strategy is not None and hasattr(basic, "bind_partitions"):  # Muon: where its matrices' pieces lie
        basic.bind_partitions(strategy)
    _broadcast_from_first_replica(module, strategy, topology)
    return strategy


def _configure_activation_checkpointing(config: ShardwiseConfig, topology: Topology) -> None:
    """An ``activation_checkpointing`` section applies to ``shardwise.checkpointing`` unless the script already
    called ``checkpointing.configure`` itself (DeepSpeed scripts usually do, with their mpu)."""
    if not config.written("activation_checkpointing"):
        return
    from shardwise import activation_checkpointing as ac
    from shardwise.tp.mpu import ModelParallelUnit

    if not ac.is_configured():
        ac.configure(ModelParallelUnit(topology), deepspeed_config=config)


def _cast_and_place(module: nn.Module, dtype: torch.dtype) -> None:
    device = get_accelerator().device()
    if dtype != torch.float32:
        module.to(dtype=dtype)
    module.to(device=device)


def _build_basic_optimizer(module: nn.Module, config: ShardwiseConfig, optimizer: Any,
                           model_parameters: Iterable | None) -> torch.optim.Optimizer | None:
    params = list(model_parameters) if model_parameters is not None else list(module.parameters())
    offload = config.zero_optimization.offload_optimizer_device != "none"
    if optimizer is not None and config.optimizer is not None:
        raise EngineBuildError(
            f"an optimizer was passed to initialize() and the config also has an `optimizer` section "
            f"(type {config.optimizer.type!r}); remove one of them"
        )
    if optimizer is None and config.optimizer is None:
        return None
    if optimizer is None:
        with _config_block("optimizer", config.optimizer):
            return build_optimizer(config.optimizer.type, dict(config.optimizer.params), params, offload=offload,
                                   named_parameters=module.named_parameters())
    if isinstance(optimizer, torch.optim.Optimizer):
        basic = optimizer
    elif callable(optimizer):
        basic = optimizer(params)
    else:
        raise EngineBuildError(f"optimizer must be a torch.optim.Optimizer or a callable, got {type(optimizer)}")
    if offload and config.zero_force_ds_cpu_optimizer and not _is_cpu_adam(basic):
        raise EngineBuildError(
            f"ZeRO-Offload is on (zero_optimization.offload_optimizer.device = "
            f"{config.zero_optimization.offload_optimizer_device!r}) with a client optimizer "
            f"({type(basic).__name__}); offload steps on the host with shardwise's CPU Adam. Either set "
            "`optimizer` in the config instead, pass shardwise.ops.adam.DeepSpeedCPUAdam, or set "
            "`zero_force_ds_cpu_optimizer: false` to step your optimizer on the host as is"
        )
    stage = config.zero_optimization.stage
    if stage >= 1 and not is_zero_supported_optimizer(basic) and not config.zero_allow_untested_optimizer:
        raise EngineBuildError(
            f"ZeRO stage {stage} steps flat partitions of the parameters, which is exact only for elementwise "
            f"optimizers; {type(basic).__name__} is not known to be one. Set `zero_allow_untested_optimizer: true` "
            "to use it anyway (per-tensor statistics such as LAMB's trust ratio are then computed per partition)"
        )
    return basic


def _is_cpu_adam(opt: torch.optim.Optimizer) -> bool:
    from shardwise.ops.adam import CPUAdam

    return isinstance(opt, CPUAdam)


def _build_strategy(module: nn.Module, config: ShardwiseConfig, topology: Topology, basic: torch.optim.Optimizer,
                    default_accum: str | None = None) -> ShardingStrategy:
    zc = config.zero_optimization
    # the parameters' actual dtype (the config's, or float64 for a double-precision model)
    dtype = next((p.dtype for p in module.parameters() if p.requires_grad), model_dtype(config))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    bucket = default_bucket_numel(trainable, zc.written_value("reduce_bucket_size"))
    accum = config.data_types.grad_accum_dtype or (default_accum if config.bf16.enabled else None)
    # the BF16 optimizer (ZeRO-1 with fp32 gradient accumulation) serves bf16 at stage 0 or 1 when fp32
    # accumulation is asked for; plain bf16 at stage 0 is DeepSpeed 0.19's data parallelism (bf16 gradients
    # all-reduced, a full fp32 master per rank)
    lp_master = low_precision_master(config)  # 16-bit master weights and gradients (docs/precision.md)
    if lp_master:
        accum = None
    bf16_optimizer = config.bf16.enabled and zc.stage in (0, 1) and accum == "fp32"
    policy = make_policy(
        zc.stage, dtype, grad_accum_dtype=accum, bf16_optimizer=bf16_optimizer, overlap_comm=zc.overlap_comm,
        reduce_scatter=zc.reduce_scatter, bucket_numel=bucket,
        offload_optimizer=zc.offload_optimizer_device != "none",
        pin_memory=bool(zc.offload_optimizer and zc.offload_optimizer.pin_memory),
        comm_dtype=config.communication_data_type, low_precision_master=lp_master,
    )
    if lp_master:
        _set_optimizer_state_dtype(basic, config)
    if zc.stage < 3 and zc.offload_optimizer_device == "nvme":
        raise EngineBuildError(
            "zero_optimization.offload_optimizer.device 'nvme' needs ZeRO stage 3 (as in DeepSpeed); use device "
            "'cpu' with stages 1-2, or set zero_optimization.stage to 3"
        )
    if zc.stage == 3:
        return Stage3Strategy(module, basic, policy, topology.zero_group, _shard_comm(zc, topology), zc)
    return FlatStrategy(module, basic, policy, topology.zero_group)


def low_precision_master(config: ShardwiseConfig) -> bool:
    """Whether the master weights and gradients stay 16-bit (``bf16.bf16_master_weights_and_grads`` or
    ``fp16.fp16_master_weights_and_grads`` with their block enabled)."""
    return bool((config.bf16.enabled and config.bf16.bf16_master_weights_and_grads)
                or (config.fp16.enabled and config.fp16.fp16_master_weights_and_grads))


def _set_optimizer_state_dtype(basic: torch.optim.Optimizer, config: ShardwiseConfig) -> None:
    """16-bit masters: optimizer states in the masters' dtype with ``bf16.bf16_optimizer_states``, else fp32.

    torch's optimizers create their states like the (16-bit) master; shardwise's CPU and fused Adam choose with
    ``fp32_optimizer_states``. fp32 states beside 16-bit masters need an optimizer that can keep them apart.
    """
    states16 = bool(config.bf16.enabled and config.bf16.bf16_optimizer_states)
    if hasattr(basic, "fp32_optimizer_states"):
        basic.fp32_optimizer_states = not states16
    elif not states16:
        path = "bf16.bf16_master_weights_and_grads" if config.bf16.enabled else "fp16.fp16_master_weights_and_grads"
        raise EngineBuildError(
            f"{path} = true keeps the optimizer states in fp32 beside 16-bit master weights, which "
            f"{type(basic).__name__} cannot do (its states follow the weights' dtype). Fix: use ZeRO-Offload's CPU "
            "Adam (zero_optimization.offload_optimizer.device \"cpu\" with an Adam/AdamW `optimizer` block)"
            + (", or also set bf16.bf16_optimizer_states = true" if config.bf16.enabled else ""))


def _shard_comm(zc: ZeroConfig, topology: Topology) -> ShardComm:
    """Flat or hierarchical (hpZ) ZeRO-3 collectives, optionally quantized (qwZ / qgZ)."""
    group = topology.zero_group
    hpz = int(zc.zero_hpz_partition_size or 1)
    quant = {"quantized_weights": bool(zc.zero_quantized_weights),
             "quantized_gradients": bool(zc.zero_quantized_gradients)}
    if hpz <= 1 or hpz >= group.size:
        return ShardComm(group, **quant)
    if group.size % hpz:
        raise EngineBuildError(
            f"zero_optimization.zero_hpz_partition_size = {hpz} does not divide the ZeRO group size {group.size}; "
            f"set it to the number of ranks per node (here {topology.local_world_size})"
        )
    intra = topology.subgroup("hpz-intra", "dp+sp", hpz)
    inter = topology.strided_subgroup("hpz-inter", "dp+sp", hpz)
    return HierarchicalShardComm(group, intra, inter, **quant)


@torch.no_grad()
def _broadcast_from_first_replica(module: nn.Module, strategy: ShardingStrategy | None, topology: Topology
                                  ) -> None:
    """Every replica starts from the weights of the first rank of its ZeRO group."""
    group = topology.zero_group
    if group.size == 1:
        return
    src = group.global_rank(0)
    flat_ids = strategy.sync_initial_weights(src) if strategy is not None else set()
    for p in module.parameters():
        if id(p) not in flat_ids:
            comm.broadcast(p.data, src=src, group=group)
    for b in module.buffers():
        comm.broadcast(b, src=src, group=group)


def _build_scheduler(config: ShardwiseConfig, lr_scheduler: Any, basic: torch.optim.Optimizer | None):
    if lr_scheduler is not None and config.scheduler is not None:
        raise EngineBuildError(
            f"an lr_scheduler was passed to initialize() and the config also has a `scheduler` section "
            f"(type {config.scheduler.type!r}); remove one of them"
        )
    if lr_scheduler is not None:
        if hasattr(lr_scheduler, "step"):
            return lr_scheduler
        if callable(lr_scheduler):
            return lr_scheduler(basic)
        raise EngineBuildError(f"lr_scheduler must be a scheduler or a callable, got {type(lr_scheduler)}")
    if config.scheduler is not None:
        if basic is None:
            raise EngineBuildError("the config has a `scheduler` but no optimizer was given or configured")
        with _config_block("scheduler", config.scheduler):
            return build_scheduler(config.scheduler.type, dict(config.scheduler.params), basic)
    return None


@contextlib.contextmanager
def _config_block(path: str, block: Any) -> Iterator[None]:
    """A constructor's complaint about the config's ``optimizer`` / ``scheduler`` values, as a ConfigError naming
    the block (the value checks in ``config/params.py`` catch most of them before; this covers the rest)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        given = {"type": block.type, "params": dict(block.params)}
        raise ConfigError(f"{path} = {show(given)}: {exc}. Fix: correct {path}.params (see docs/optimizers.md).",
                          path=f"{path}.params") from exc
