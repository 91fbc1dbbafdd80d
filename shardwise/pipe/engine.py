"""``PipelineEngine``: ``train_batch`` / ``eval_batch`` over a ``PipelineModule``, on the base engine's machinery.

``build_pipeline_engine`` builds the ordinary engine (cast, optimizer, ZeRO-0/1 or BF16-optimizer strategy over the
stage's data-parallel group, scheduler, loader) and re-wraps its parts in a ``PipelineEngine``, which replaces
forward/backward/step with schedules (``schedule.py``) executed by ``executor.py``. Per batch:

1. every micro-batch flows through the stages (1F1B, or interleaved 1F1B with ``virtual_stages``); gradients
   accumulate locally (no data-parallel traffic during the schedule);
2. tied weights: their accumulated gradients are summed over the stages that hold them;
3. one data-parallel reduction of the whole stage (reduce-scatter for ZeRO-1 / the BF16 optimizer);
4. the base engine's step: global norm, clipping, overflow check, optimizer, LR schedule, counters, step log.

[Note: pipeline gradient norm] Gradient clipping uses the true global norm: every stage contributes the squared
norm of the gradients it owns, weights replicated across tensor-parallel ranks count once (tensor rank 0), tied
weights count once (on their first holding stage), and the sum runs over the whole grid. DeepSpeed's fp32
pipelines count only stage 0's non-model-parallel weights (so the clip coefficient depends on how layers are
split); here the result equals single-process ``clip_grad_norm_`` on the whole model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shardwise import comm
from shardwise.comm.topology import Topology
from shardwise.engine.engine import Engine
from shardwise.engine.precision import model_dtype
from shardwise.pipe import schedule as S
from shardwise.pipe.executor import BatchResult, BatchStats, StageExecutor
from shardwise.pipe.module import PipelineError, PipelineModule
from shardwise.pipe.p2p import P2P
from shardwise.utils.repeating_loader import RepeatingLoader

if TYPE_CHECKING:
    from shardwise.config import ShardwiseConfig
    from shardwise.engine.strategy import ShardingStrategy


__all__ = ["PipelineEngine", "build_pipeline_engine"]


class PipelineEngine(Engine):
    """Hybrid pipeline x data (x tensor) parallel training (``deepspeed.runtime.pipe.engine.PipelineEngine``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        module = self.module
        if not isinstance(module, PipelineModule):
            raise PipelineError("PipelineEngine needs a PipelineModule")
        pc = self._config.pipeline
        self.num_stages = self.topology.size("pp")
        self.stage_id = self.topology.coord("pp")
        self.micro_batch_size = self.train_micro_batch_size_per_gpu()
        self.micro_batches = self.gradient_accumulation_steps()
        self.is_pipe_parallel = self.num_stages > 1
        self.is_data_parallel = self.topology.size("dp") > 1
        self.is_model_parallel = self.topology.size("tp") > 1
        self.is_pipe_partitioned = self.is_model_parallel and pc.pipe_partitioned
        self.is_grad_partitioned = self.is_model_parallel and pc.grad_partitioned
        self.p2p = P2P(self.topology, pipe_partitioned=pc.pipe_partitioned, grad_partitioned=pc.grad_partitioned,
                       dynamic_shape=module.dynamic_shape)
        self.executor = StageExecutor(self)
        self.data_iterator: Any = None
        self.batch_fn: Callable | None = None
        self.agg_train_loss: torch.Tensor | None = None
        self.last_batch_stats = BatchStats()
        self._force_grad_boundary = False
        self._tied_duplicate_ids = {id(p) for p in module.tied_duplicates()}
        #: dtype the first stage casts floating inputs to (the model's training dtype)
        self.compute_dtype = model_dtype(self._config)
        if self.training_dataloader is not None:
            self.set_dataloader(self.training_dataloader)

    # -- DeepSpeed's pipeline API ---------------------------------------------------------------------------------
    def is_first_stage(self) -> bool:
        """This rank runs the first stage (reads the inputs)."""
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        """This rank runs the last stage (computes the loss)."""
        return self.stage_id == self.num_stages - 1

    def get_pipeline_parallel_rank(self) -> int:
        """Stage index of this rank."""
        return self.stage_id

    def set_dataloader(self, loader: Iterable) -> None:
        """Read micro-batches from ``loader`` (restarted when exhausted)."""
        self.training_dataloader = loader if isinstance(loader, RepeatingLoader) else RepeatingLoader(loader)
        self.data_iterator = iter(self.training_dataloader)

    def set_dataiterator(self, iterator: Any) -> None:
        """Read micro-batches from ``iterator``: each item is ``(inputs, labels)``, inputs a tensor or a tuple."""
        self.data_iterator = iterator

    def set_batch_fn(self, fn: Callable) -> None:
        """Post-process every batch read from the iterator with ``fn(batch)``."""
        self.batch_fn = fn

    def reset_activation_shape(self) -> None:
        """Renegotiate boundary tensor shapes (call when they change, e.g. a new sequence length)."""
        self.p2p.reset()

    def is_gradient_accumulation_boundary(self) -> bool:
        """True only while the engine reduces gradients or steps (DeepSpeed's pipeline semantics)."""
        return self._force_grad_boundary

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Not available with pipeline parallelism: use ``train_batch()`` / ``eval_batch()``."""
        raise PipelineError("only train_batch() and eval_batch() are available in pipeline mode")

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        """Not available with pipeline parallelism: ``train_batch()`` runs backward."""
        raise PipelineError("only train_batch() and eval_batch() are available in pipeline mode")

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Not available with pipeline parallelism: ``train_batch()`` steps the optimizer."""
        raise PipelineError("only train_batch() and eval_batch() are available in pipeline mode")

    # -- training -------------------------------------------------------------------------------------------------
    def train_batch(self, data_iter: Any = None) -> torch.Tensor:
        """Train on ``gradient_accumulation_steps`` micro-batches and step; returns the mean loss on every rank.

        The loss is averaged over the micro-batches and the data-parallel replicas (a float32 scalar tensor).
        """
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() needs gradients enabled; use eval_batch() under no_grad()")
        if self.strategy is None:
            raise PipelineError("train_batch() needs an optimizer: pass one to initialize() or configure `optimizer`")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self._step_started = time.perf_counter()
        schedule = S.make_train_schedule(self.micro_batches, self.num_stages, self.stage_id,
                                         self.module.virtual_stages)
        result = self.executor.run(schedule, train=True)
        self.last_batch_stats = result.stats
        self.micro_steps += self.micro_batches
        return self.agg_train_loss

    def _loss_multiplier(self) -> float:
        """What the last stage multiplies each micro-batch loss by before backward: 1/accumulation x loss scale."""
        return self.scaler.scale / self.micro_batches

    def _reduce_tied_grads(self) -> None:
        """Sum the locally accumulated gradients of tied weights over the stages holding them."""
        for weight, group in self.module.get_tied_weights_and_groups():
            if weight.requires_grad:
                comm.all_reduce(_accumulated_grad(self.strategy, weight), group=group)

    def _reduce_grads(self) -> None:
        """One data-parallel reduction of everything this stage accumulated (bucketed, launched now)."""
        self._force_grad_boundary = True
        self.strategy.begin_backward(True)
        self.strategy.end_backward()
        self._force_grad_boundary = False

    def _optimizer_step(self, result: BatchResult) -> None:
        self.agg_train_loss = self._aggregate_loss(result.losses)
        self.step_log.record_loss(self.agg_train_loss)
        self._force_grad_boundary = True
        self._take_model_step({})
        self._force_grad_boundary = False

    def _aggregate_loss(self, losses: list[Any]) -> torch.Tensor:
        """Mean over micro-batches (last stage), averaged over data-parallel replicas, broadcast to every stage."""
        value = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.is_last_stage():
            value = (torch.stack([torch.as_tensor(x, dtype=torch.float32).reshape(()) for x in losses]).mean()
                     .to(self.device))
            group = self.topology.zero_group
            if group.size > 1:
                comm.all_reduce(value, group=group)
                value /= group.size
        comm.broadcast(value, src=self.topology.rank_at(pp=self.num_stages - 1), group=self.topology.pp_group)
        return value

    def _norm_excluded_params(self) -> list[nn.Parameter]:
        """Also exclude the tied-weight copies held by stages other than the weight's first user (see
        [Note: pipeline gradient norm]): a tied weight counts once, the tensor-replicated ones too."""
        tied = [p for p in self.module.parameters() if p.requires_grad and id(p) in self._tied_duplicate_ids]
        known = {id(p) for p in tied}
        return tied + [p for p in super()._norm_excluded_params() if id(p) not in known]

    def _next_batch(self) -> Any:
        if self.data_iterator is None:
            raise PipelineError(
                "no training data on this stage: pass data_iter to train_batch()/eval_batch(), call "
                "engine.set_dataiterator(it), or give initialize() training_data"
            )
        batch = next(self.data_iterator)
        return self.batch_fn(batch) if self.batch_fn is not None else batch

    # -- evaluation -----------------------------------------------------------------------------------------------
    def eval_batch(self, data_iter: Any, return_logits: bool = False, compute_loss: bool = True,
                   reduce_output: str | None = "avg", bcast_loss: bool = True,
                   num_micro_batches: int | None = None) -> Any:
        """Forward ``num_micro_batches`` (default: gradient_accumulation_steps) micro-batches without gradients.

        Returns the loss averaged over micro-batches and data-parallel replicas (``reduce_output="avg"``; None:
        the list of per-micro-batch outputs). With ``bcast_loss`` every rank gets it; otherwise only the last
        stage's ranks do and the others return None (DeepSpeed's behaviour). ``return_logits`` returns
        ``(loss, logits)`` with the last micro-batch's outputs on the last stage (None elsewhere), as DeepSpeed.
        """
        self.module.eval()
        saved = self.data_iterator
        self.set_dataiterator(data_iter)
        micro = num_micro_batches or self.micro_batches
        schedule = S.InferenceSchedule(micro, self.num_stages, self.stage_id, self.module.virtual_stages)
        try:
            with torch.no_grad():
                result = self.executor.run(schedule, train=False, compute_loss=compute_loss,
                                           keep_last_outputs=return_logits)
        finally:
            self.data_iterator = saved  # the module stays in eval mode, as DeepSpeed leaves it
        output = self._reduce_outputs(result.losses, reduce_output) if self.is_last_stage() else None
        if compute_loss and bcast_loss and self.num_stages > 1:
            src = self.topology.rank_at(pp=self.num_stages - 1)
            output = comm.broadcast_object(_to_cpu(output), src=src, group=self.topology.pp_group)
            output = _to_device(output, self.device)
        if return_logits:
            return output, result.last_outputs
        return output

    def _reduce_outputs(self, outputs: list[Any], reduce: str | None) -> Any:
        if reduce is None:
            return outputs
        if reduce.lower() != "avg":
            raise ValueError(f"reduce_output {reduce!r} is not supported; use 'avg' or None")
        if torch.is_tensor(outputs[0]):
            reduced: Any = torch.stack([o.float() for o in outputs]).mean(0)
            parts = [reduced]
        else:
            reduced = [torch.stack([o[i].float() for o in outputs]).mean(0) for i in range(len(outputs[0]))]
            parts = reduced
        group = self.topology.zero_group
        if group.size > 1:
            for t in parts:
                comm.all_reduce(t, group=group)
                t /= group.size
        return reduced

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[str | None, dict]:
        """Load a checkpoint saved with any number of stages (or none); ``(load_path, client_state)``.

        Each stage loads the layers it holds. ``load_module_strict`` is checked over the whole pipeline: every
        saved tensor must be held by some stage and every stage's tensor must be in the checkpoint.
        """
        staged = self.num_stages > 1
        path, client = super().load_checkpoint(
            load_dir, tag=tag, load_module_strict=load_module_strict and not staged,
            load_optimizer_states=load_optimizer_states, load_lr_scheduler_states=load_lr_scheduler_states,
            load_module_only=load_module_only, custom_load_fn=custom_load_fn)
        if path is not None and load_module_strict and staged:
            self._check_pipeline_names(path)
        return path, client

    def _check_pipeline_names(self, tag_dir: str) -> None:
        from shardwise.checkpoint.files import read_manifest

        local = sorted(self.module.state_dict().keys())
        held = {n for names in comm.all_gather_object(local, group=self.topology.pp_group) for n in names}
        manifest = read_manifest(tag_dir)
        saved, aliases = set(manifest["tensors"]), manifest.get("aliases", {})
        missing = sorted(n for n in held if n not in saved and aliases.get(n) not in saved
                         and n not in manifest.get("excluded", []))
        unexpected = sorted(n for n in saved if n not in held)
        if missing or unexpected:
            raise PipelineError(
                f"the checkpoint {tag_dir} does not match the pipeline model: missing {len(missing)} tensor(s) "
                f"{missing[:8]}, unexpected {len(unexpected)} {unexpected[:8]}; the layers were loaded where names "
                "match. Build the same layer list, or pass load_module_strict=False"
            )

    def __repr__(self) -> str:
        return (f"PipelineEngine(stage {self.stage_id}/{self.num_stages}, chunks {self.module.virtual_stages}; "
                f"{self.strategy.describe() if self.strategy else 'no optimizer'}; {self.topology.describe()})")


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _accumulated_grad(strategy: ShardingStrategy, param: nn.Parameter) -> torch.Tensor:
    """This rank's locally accumulated (not yet data-parallel reduced) gradient of ``param``, as a view."""
    try:
        return strategy.accumulated_grad(param)
    except (KeyError, RuntimeError) as exc:
        raise PipelineError(f"tied weights need the local gradient of each copy: {exc}") from exc


def _non_reentrant_checkpoint() -> Callable:
    try:
        from shardwise.checkpointing import non_reentrant_checkpoint

        return non_reentrant_checkpoint
    except (ImportError, AttributeError):
        from torch.utils.checkpoint import checkpoint

        return partial(checkpoint, use_reentrant=False)


def build_pipeline_engine(*, module: nn.Module, config: ShardwiseConfig, topology: Topology, optimizer: Any = None,
                          model_parameters: Iterable | None = None, lr_scheduler: Any = None,
                          training_data: Any = None, collate_fn: Callable | None = None) -> PipelineEngine:
    """Build the engine for a ``PipelineModule`` (called by ``shardwise.initialize``)."""
    from shardwise.engine.build import build_engine

    if not isinstance(module, PipelineModule):
        raise PipelineError(f"build_pipeline_engine needs a PipelineModule, got {type(module).__name__}")
    stage = config.zero_optimization.stage
    if stage >= 2:
        raise PipelineError(
            f"zero_optimization.stage {stage} is incompatible with pipeline parallelism (as in DeepSpeed): "
            "gradients must stay whole while micro-batches are in flight. Use stage 1 (optimizer states "
            "partitioned over data-parallel ranks; with bf16 this is the BF16 optimizer) or stage 0"
        )
    pc = config.pipeline
    if pc.stages != "auto" and int(pc.stages) != module.num_stages:
        raise PipelineError(f"config pipeline.stages = {pc.stages} but the PipelineModule has {module.num_stages} "
                            "stages; set pipeline.stages to \"auto\" or to the module's num_stages")
    gas, chunks = config.gradient_accumulation_steps, module.virtual_stages
    if chunks > 1 and gas % module.num_stages:
        raise PipelineError(
            f"virtual_stages={chunks} (interleaved 1F1B) needs gradient_accumulation_steps ({gas}) to be a multiple "
            f"of the number of pipeline stages ({module.num_stages}); change the batch sizes or use virtual_stages=1"
        )
    if pc.activation_checkpoint_interval > 0:
        module.activation_checkpoint_interval = pc.activation_checkpoint_interval
    if pc.use_reentrant is False:
        module.activation_checkpoint_func = _non_reentrant_checkpoint()
    return build_engine(module=module, config=config, topology=topology, optimizer=optimizer,
                        model_parameters=model_parameters, lr_scheduler=lr_scheduler, training_data=training_data,
                        collate_fn=collate_fn, engine_cls=PipelineEngine, default_grad_accum_dtype="fp32")
