"""The fixed order in which ``init_inference`` turns a model (or a config) into a loaded, split, ready module.

1. check the dtype and graph-capture request against the accelerator (fail before any work);
2. start torch.distributed and find the tensor-parallel group (``tp_group`` / ``mpu`` / a new ``Topology``);
3. get the model: the one handed in (real or meta), or one built on the meta device from a Hugging Face config;
4. plan the split (every divisibility / architecture error is raised here, before any weight is read);
5. swap the projections for meta tensor-parallel layers;
6. load this rank's slices from the checkpoint (or from the model's own weights) straight to the device, in the
   inference dtype; re-tie tied weights; compute the tensors no checkpoint holds (non-persistent buffers such as
   rotary tables, kept in their own dtype as ``from_pretrained(dtype=...)`` keeps them: ``buffers.py``);
7. make sampling agree across ranks (rank 0's RNG state everywhere, as DeepSpeed does).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardwise import comm
from shardwise.accelerator import get_accelerator
from shardwise.comm.group import Group, as_group
from shardwise.comm.init import oversubscription_hint
from shardwise.common.logging import human_bytes, log_dist
from shardwise.inference import autotp, loader
from shardwise.inference.buffers import finalize_buffers
from shardwise.inference.collectives import make_collectives
from shardwise.inference.config import DeepSpeedInferenceConfig
from shardwise.inference.layers import keep_head_input_contiguous


@dataclass
class Built:
    """The result of ``build_inference``."""

    module: nn.Module
    group: Group
    topology: Any
    plan: autotp.TPPlan
    stats: loader.LoadStats
    device: torch.device


def _check_accelerator(cfg: DeepSpeedInferenceConfig) -> Any:
    acc = get_accelerator()
    if cfg.dtype not in acc.supported_dtypes():
        raise ValueError(f"dtype {cfg.dtype} is not supported by the {acc.device_name()} accelerator; use one of "
                         f"{acc.supported_dtypes()}")
    if cfg.enable_cuda_graph and not acc.supports_graph_capture():
        raise ValueError(f"enable_cuda_graph=True, but the {acc.device_name()} accelerator has no graph capture "
                         "(CUDA graphs need cuda, HPU graphs need hpu). Fix: remove enable_cuda_graph (the model "
                         "runs eagerly), or run on a cuda/hpu device")
    return acc


def _tp_group(cfg: DeepSpeedInferenceConfig) -> tuple[Group, Any]:
    tp = cfg.tensor_parallel
    world_env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if tp.tp_size > 1 or tp.tp_group is not None or tp.mpu is not None or world_env > 1 or dist.is_initialized():
        comm.init_distributed(verbose=False)
    if tp.tp_group is not None:
        group = as_group(tp.tp_group)
        tp.tp_size = group.size
        return group, None
    if tp.mpu is not None:
        from shardwise.tp.mpu import topology_from_mpu

        topology = topology_from_mpu(tp.mpu)
        tp.tp_size = topology.size("tp")
        return topology.tp_group, topology
    world = dist.get_world_size() if dist.is_initialized() else 1
    if tp.tp_size > world or world % tp.tp_size:
        raise ValueError(f"tensor_parallel.tp_size={tp.tp_size} does not divide the {world} ranks of this job; "
                         f"launch {tp.tp_size} (or a multiple) processes, e.g. `shardwise --num_gpus {tp.tp_size} "
                         "script.py`, or lower tp_size")
    from shardwise.comm.topology import Topology

    topology = Topology(tp=tp.tp_size)
    return topology.tp_group, topology


def _model_from_config(model: Any, cfg: DeepSpeedInferenceConfig) -> nn.Module:
    """Build the model on meta from a Hugging Face config (given, or config.json beside the checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    config = model if isinstance(model, PretrainedConfig) else None
    if config is None:
        ckpt = cfg.checkpoint if isinstance(cfg.checkpoint, str) else ""
        candidates = [ckpt, os.path.join(cfg.base_dir, ckpt) if ckpt else "", cfg.base_dir,
                      os.path.dirname(ckpt) if ckpt.endswith(".json") else ""]
        where = next((d for d in candidates if d and os.path.isfile(os.path.join(d, "config.json"))), None)
        if where is None:
            raise ValueError("init_inference needs a model: an nn.Module (real, or built on the meta device with "
                             "shardwise.OnDevice), a transformers config, or checkpoint=<a Hugging Face model "
                             "directory with config.json> (or a checkpoints JSON with config.json in base_dir)")
        config = AutoConfig.from_pretrained(where)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _cast_in_place(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """tp=1 without a checkpoint: DeepSpeed's ``module.half()`` / ``.to(device)`` for parameters and persistent
    buffers, no copy when already there. A tensor shared by several modules (a tied LM head) is converted once and
    stays shared. Non-persistent buffers only move (``buffers.finalize_buffers``)."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        tables = [(module._parameters, ()), (module._buffers, module._non_persistent_buffers_set)]
        for table, skip in tables:
            for name, t in table.items():
                if t is None or name in skip:
                    continue
                if id(t) not in done:
                    new = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                    if isinstance(t, nn.Parameter):
                        new = t if new is t else nn.Parameter(new, requires_grad=False)
                        new.requires_grad_(False)
                    done[id(t)] = new
                table[name] = done[id(t)]


def _sync_rng(acc: Any, tp: int) -> None:
    """With tensor parallelism every rank samples with rank 0's generator state, so that sampled tokens agree
    across the ranks of a model (DeepSpeed broadcasts it the same way)."""
    if tp == 1 or not dist.is_initialized():
        return
    state = acc.get_rng_state()
    buf = state.to("cpu" if acc.device_name() == "cpu" else acc.current_device_name())
    comm.broadcast(buf, src=0)
    acc.set_rng_state(buf.cpu())


def _device(cfg: DeepSpeedInferenceConfig, acc: Any) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    if cfg.keep_module_on_host:
        return torch.device("cpu")
    return acc.device()


def build_inference(model: Any, cfg: DeepSpeedInferenceConfig) -> Built:
    """Run the steps of the module docstring; see ``init_inference`` for the arguments' meaning."""
    acc = _check_accelerator(cfg)
    group, topology = _tp_group(cfg)
    tp = cfg.tensor_parallel.tp_size
    if not isinstance(model, nn.Module):
        model = _model_from_config(model, cfg)
    autotp.tie_declared_weights(model)
    plan = autotp.plan_tensor_parallel(model, tp, injection_policy=cfg.injection_policy,
                                       vocab_parallel=cfg.tensor_parallel.vocab_parallel)
    device, dtype = _device(cfg, acc), cfg.dtype
    has_meta = any(True for _ in loader.iter_meta(model))
    if tp == 1 and not cfg.checkpoint and not has_meta:
        _cast_in_place(model, dtype, device)
        stats = loader.LoadStats()
    else:
        split = autotp.apply_tensor_parallel(model, plan, group, make_collectives(group, acc))
        targets = autotp.load_targets(model, split, plan.tied)
        if cfg.checkpoint:
            files = loader.resolve_checkpoint(cfg.checkpoint, cfg.base_dir)
            stats = loader.load_checkpoint(files, targets, dtype, device)
        else:
            stats = loader.load_in_memory(targets, dtype, device)
        del split, targets
        autotp.retie(model, plan.tied)
    finalize_buffers(model, device)
    keep_head_input_contiguous(model)
    model.eval()
    _sync_rng(acc, tp)
    _log(plan, stats, cfg, device)
    return Built(model, group, topology, plan, stats, device)


def _log(plan: autotp.TPPlan, stats: loader.LoadStats, cfg: DeepSpeedInferenceConfig, device: torch.device) -> None:
    log_dist(f"init_inference: {plan.summary()}; dtype={cfg.dtype}, device={device}")
    if stats.tensors:
        log_dist(f"init_inference: read {human_bytes(stats.bytes_read)} of {human_bytes(stats.bytes_full)} "
                 f"({stats.tensors} tensors, {stats.files} files) in {stats.seconds:.2f}s on this rank")
    hint = oversubscription_hint(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if device.type == "cpu" and hint:
        log_dist(f"init_inference: {hint}", level=logging.WARNING)
    if cfg.replace_with_kernel_inject:
        log_dist("init_inference: replace_with_kernel_inject=True: shardwise has no fused inference kernels; the "
                 "model keeps its own modules (automatically tensor-parallel when tp_size > 1), so outputs match "
                 f"the single-process model; max_out_tokens={cfg.max_out_tokens} is enforced in generate()")
