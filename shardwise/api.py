"""The DeepSpeed-shaped entry points: ``initialize`` and ``add_config_arguments``.

``initialize`` = start torch.distributed if needed -> build the process grid -> resolve the config against it ->
build the engine. It returns DeepSpeed's 4-tuple ``(engine, optimizer, training_dataloader, lr_scheduler)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from shardwise import comm
from shardwise.comm.topology import Topology
from shardwise.common.logging import log_dist
from shardwise.config import add_config_arguments, autotp_size, load_config, read_config_dict, sequence_parallel_size
from shardwise.config.errors import ConfigError
from shardwise.config.schema_comms import comms_timeout
from shardwise.monitor.utils import check_backends

__all__ = ["initialize", "add_config_arguments"]


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Iterable | None = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int = 29500,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Callable | None = None,
    config: Any = None,
    mesh_param: Any = None,
    config_params: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """Wrap ``model`` for distributed training; returns ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    ``config`` (or legacy ``config_params``, or ``args.deepspeed_config``) is a ds_config dict or path.
    ``optimizer`` and ``lr_scheduler`` may be objects or callables (called with the parameters / the optimizer).
    ``mpu`` is a Megatron-style model-parallel unit; without it, tensor parallelism is 1 and sequence
    parallelism comes from ``sequence_parallel_size`` in the config.
    """
    if model is None:
        raise ValueError("initialize() needs a model (an nn.Module)")
    source = config if config is not None else config_params if config_params is not None else args
    if source is None:
        raise ValueError(
            "initialize() needs a config: pass config=<dict or path to ds_config.json>, or args with "
            "--deepspeed_config (see shardwise.add_config_arguments)"
        )
    raw = read_config_dict(source)
    comm.init_distributed(distributed_port=distributed_port, dist_init_required=dist_init_required,
                          timeout=comms_timeout(raw))
    topology = _topology(raw, model, mpu, mesh_param)
    cfg = load_config(_autotp_world_batch(raw, source, topology, model, mpu), dp_world_size=topology.size("dp"))
    _apply_autotp(model, cfg, topology)
    comm.configure(cfg.comms_logger)
    check_backends(cfg)  # a monitor whose package is missing fails here, on every rank, before any work
    if _is_pipeline_module(model):
        if mpu is not None:
            raise ValueError("a PipelineModule carries its own topology; pass mpu=None (as DeepSpeed requires)")
        from shardwise.pipe.engine import build_pipeline_engine as build_engine
    else:
        from shardwise.engine.build import build_engine

    engine = build_engine(module=model, config=cfg, topology=topology, optimizer=optimizer,
                          model_parameters=model_parameters, lr_scheduler=lr_scheduler, training_data=training_data,
                          collate_fn=collate_fn)
    if mpu is not None:
        engine.mpu = mpu
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def _is_pipeline_module(model: Any) -> bool:
    return any(cls.__name__ == "PipelineModule" and cls.__module__.startswith("shardwise")
               for cls in type(model).__mro__)


def _topology(raw: dict[str, Any], model: Any, mpu: Any, mesh_param: Any) -> Topology:
    """The process grid: a pipeline module's own topology, a Megatron-style mpu's, AutoTP's (tensor x data), or
    data (x sequence) parallel."""
    autotp = autotp_size(raw)
    if _is_pipeline_module(model):
        if autotp > 1:
            raise ConfigError(f"tensor_parallel.autotp_size = {autotp} with a PipelineModule: AutoTP training splits "
                              "Hugging Face models, not pipelines. Fix: remove autotp_size, or give the "
                              "PipelineModule a topology with a tensor axis", path="tensor_parallel.autotp_size")
        return model.topology()
    sp = sequence_parallel_size(raw)
    autotp_topology = _autotp_topology(model, autotp, mpu, sp)
    if autotp_topology is not None:
        return autotp_topology
    if mpu is not None:
        from shardwise.tp.mpu import topology_from_mpu

        topology = topology_from_mpu(mpu)
        if sp > 1 and sp != topology.size("sp"):
            raise ConfigError(f"sequence_parallel_size = {sp} in the config, but the mpu passed to initialize() has "
                             f"a sequence-parallel size of {topology.size('sp')}; make them equal or drop the key "
                             "(the mpu decides)", path="sequence_parallel_size")
        return topology
    if mesh_param is not None:
        _, sp = mesh_param
    return Topology(sp=sp)


def _autotp_topology(model: Any, autotp: int, mpu: Any, sp: int) -> Topology | None:
    """The tensor x data grid of AutoTP training: the one ``tp_model_init`` split the model over, or a new one for
    ``tensor_parallel.autotp_size`` (the model is split after the config is validated); None without AutoTP."""
    from shardwise.tp.autotp import applied_topology

    applied = applied_topology(model) if isinstance(model, nn.Module) else None
    if applied is None and autotp <= 1:
        return None
    if mpu is not None and _is_ulysses_mpu(mpu):
        raise ConfigError("tensor_parallel.autotp_size (or tp_model_init) together with Ulysses sequence parallelism "
                          "(UlyssesSPAttentionHF.register_with_transformers; in Accelerate and Trainer: "
                          "ParallelismConfig(sp_size=N, sp_backend=\"deepspeed\")): shardwise does not combine AutoTP "
                          "training with Ulysses yet. Fix: use one of them: remove tensor_parallel.autotp_size from "
                          "the DeepSpeed config, or set sp_size=1", path="tensor_parallel.autotp_size")
    if mpu is not None:
        raise ConfigError("tensor_parallel.autotp_size (or tp_model_init) together with an mpu: AutoTP builds its own "
                          "tensor x data grid. Fix: pass mpu=None, or drop autotp_size and split the model "
                          "yourself", path="tensor_parallel.autotp_size")
    if sp > 1:
        raise ConfigError(f"tensor_parallel.autotp_size with sequence_parallel_size = {sp}: AutoTP training does not "
                          "combine with Ulysses yet. Fix: drop one of them", path="sequence_parallel_size")
    if applied is not None:
        if autotp > 1 and autotp != applied.size("tp"):
            raise ConfigError(f"tensor_parallel.autotp_size = {autotp}, but tp_model_init split the model over "
                              f"{applied.size('tp')} ranks. Fix: make them equal or drop autotp_size",
                              path="tensor_parallel.autotp_size")
        return applied
    return Topology(tp=autotp)


def _is_ulysses_mpu(mpu: Any) -> bool:
    """Whether ``mpu`` is the one ``UlyssesSPAttentionHF.register_with_transformers`` returned."""
    from shardwise.sp.hf_registry import active_mpu

    return mpu is active_mpu()


def _autotp_world_batch(raw: dict[str, Any], source: Any, topology: Topology, model: Any, mpu: Any) -> Any:
    """The config source, with ``train_batch_size`` restated per data-parallel rank when it was written the way
    DeepSpeed checks it under AutoTP.

    DeepSpeed builds its config before AutoTP's groups, with no mpu, so it checks ``train_batch_size`` against
    micro x accumulation x the *world* size, tensor ranks included; Hugging Face Trainer and Accelerate fill
    ``"auto"`` that way (``world_size x per_device x accumulation``). Tensor ranks share their batch, so the samples
    per step are micro x accumulation x data-parallel size: that is what the engine uses. Any other mismatch is left
    for ``load_config`` to report. Only AutoTP's grid is restated (a PipelineModule's or an mpu's tensor axis is
    Megatron-style, where DeepSpeed counts data-parallel ranks only), and only when all three batch keys are written
    (as Trainer and Accelerate write them): with one left out, ``load_config`` derives it from the other two."""
    from shardwise.tp.autotp import applied_topology

    tp = topology.size("tp")
    if tp <= 1 or mpu is not None or _is_pipeline_module(model):
        return source
    if autotp_size(raw) <= 1 and not (isinstance(model, nn.Module) and applied_topology(model) is not None):
        return source
    tbs, micro = raw.get("train_batch_size"), raw.get("train_micro_batch_size_per_gpu")
    gas = raw.get("gradient_accumulation_steps")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (tbs, micro, gas)):
        return source
    dp = topology.size("dp")
    if tbs == micro * gas * dp or tbs != micro * gas * dp * tp:
        return source
    log_dist(f"train_batch_size {tbs} counts the {tp} tensor-parallel ranks as DeepSpeed does under AutoTP; "
             f"each step trains on {micro * gas * dp} samples (micro {micro} x accumulation {gas} x "
             f"data-parallel {dp})", ranks=[0])
    return {**raw, "train_batch_size": micro * gas * dp}


def _apply_autotp(model: Any, cfg: Any, topology: Topology) -> None:
    """Split the model for ``tensor_parallel.autotp_size`` unless ``tp_model_init`` already did."""
    from shardwise.tp.autotp import applied_topology, autotp_split

    if _is_pipeline_module(model):
        return
    applied = applied_topology(model)
    if applied is not None and cfg.zero_optimization.stage == 3:
        raise ConfigError(f"zero_optimization.stage 3 with a model split by tp_model_init (tp={applied.size('tp')}): "
                          "AutoTP training combines with ZeRO stages 0-2 only (as in DeepSpeed). Fix: use stage 1 "
                          "or 2", path="zero_optimization.stage")
    if cfg.tensor_parallel.autotp_size <= 1 or applied is not None:
        return
    autotp_split(model, topology, mlp_grain=cfg.tensor_parallel.tp.tp_grain_size)
