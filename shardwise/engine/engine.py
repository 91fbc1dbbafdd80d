"""``Engine``: what ``shardwise.initialize`` returns. Forward, backward, step; owns no sharding logic.

The engine counts micro-steps, scales the loss (gradient accumulation, fp16 loss scale), decides the accumulation
boundary, computes the global gradient norm once, clips, skips overflowed steps, steps the LR schedule and prints
the step log. Where gradients live and how they are reduced belongs to the sharding strategy it was built with
(an ``engine/strategy.py`` ``ShardingStrategy``: ``zero/flat_strategy.py`` for stages 0-2, ``zero/stage3/`` for
stage 3). DeepSpeed's ``DeepSpeedEngine`` method names are kept.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from shardwise import comm
from shardwise.accelerator import get_accelerator
from shardwise.comm.topology import Topology
from shardwise.common.logging import log_dist, logger
from shardwise.config import ShardwiseConfig
from shardwise.data.engine_api import DataEfficiencyMixin
from shardwise.engine import model_parallel
from shardwise.engine.autocast import Autocast
from shardwise.engine.backward_hooks import BackwardHooks
from shardwise.engine.deepspeed_surface import DeepSpeedSurfaceMixin
from shardwise.engine.guards import NonFiniteMonitor, check_unused_parameters
from shardwise.engine.precision import DynamicLossScaler, NoScaler, cast_inputs_half
from shardwise.engine.step_log import StepLog
from shardwise.engine.strategy import ShardingStrategy
from shardwise.monitor.training import TrainingObserver
from shardwise.utils.timers import Timers


class EngineUsageError(RuntimeError, AssertionError):
    """An engine method called where it cannot work (``step()`` inside ``no_sync()``, ``no_sync()`` with ZeRO-2/3);
    an AssertionError too, as DeepSpeed raises for these."""


class Engine(DataEfficiencyMixin, DeepSpeedSurfaceMixin, nn.Module):
    """A model wrapped for distributed training (``deepspeed.DeepSpeedEngine``); curriculum learning and random-LTD
    methods come from ``shardwise.data.engine_api``."""

    def __init__(self, *, module: nn.Module, config: ShardwiseConfig, topology: Topology,
                 strategy: ShardingStrategy | None, scaler: DynamicLossScaler | NoScaler, lr_scheduler: Any = None,
                 training_dataloader: Any = None) -> None:
        super().__init__()
        self.module = module
        self._config = config
        self.topology = topology
        self.strategy = strategy
        self.scaler = scaler
        self.lr_scheduler = lr_scheduler
        self.training_dataloader = training_dataloader
        self.optimizer = strategy.optimizer if strategy is not None else None
        self._record_overflow(False)
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self._boundary_override: bool | None = None
        self._in_no_sync = False
        self._global_grad_norm: float | None = None
        self._nonfinite = NonFiniteMonitor(config)
        self._step_started: float | None = None
        self.timers = Timers(synchronize=config.wall_clock_breakdown)
        self.step_log = StepLog(config.steps_per_print, config.train_batch_size)
        self._observer = TrainingObserver(self)  # monitors, flops profiler, memory table (shardwise/monitor/)
        self.monitor = self._observer.monitor  # DeepSpeed's MonitorMaster: engine.monitor.write_events(...)
        self._setup_data_efficiency()  # legacy curriculum and random-LTD schedulers (shardwise/data/)
        self._plain_backward = BackwardHooks(self)  # plain loss.backward() == engine.backward(loss)
        self._autocast = Autocast(config, get_accelerator().device().type)  # torch_autocast (engine/autocast.py)

    # -- DeepSpeed's accessors ------------------------------------------------------------------------------------
    @property
    def config(self) -> ShardwiseConfig:
        """The resolved configuration (typed sections named as in ds_config.json)."""
        return self._config

    def train_batch_size(self) -> int:
        """Samples per optimizer step over all data-parallel ranks."""
        return self._config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        """Samples per forward on one rank."""
        return self._config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self._config.gradient_accumulation_steps

    def zero_optimization_stage(self) -> int:
        """The ZeRO stage (0-3)."""
        return self._config.zero_optimization.stage

    def zero_optimization(self) -> bool:
        """Whether any ZeRO stage above 0 is on."""
        return self._config.zero_optimization.stage > 0

    def bfloat16_enabled(self) -> bool:
        """Whether the model trains in bf16."""
        return self._config.bf16.enabled

    def fp16_enabled(self) -> bool:
        """Whether the model trains in fp16 with loss scaling."""
        return self._config.fp16.enabled

    def fp16_master_weights_and_gradients(self) -> bool:
        """Whether fp16 master weights and gradients are kept (``fp16.fp16_master_weights_and_grads``)."""
        return bool(self._config.fp16.enabled and self._config.fp16.fp16_master_weights_and_grads)

    def bf16_master_weights_and_gradients(self) -> bool:
        """Whether bf16 master weights and gradients are kept (``bf16.bf16_master_weights_and_grads``)."""
        return bool(self._config.bf16.enabled and self._config.bf16.bf16_master_weights_and_grads)

    def bf16_optimizer_states(self) -> bool:
        """Whether optimizer states are kept in bf16 (``bf16.bf16_optimizer_states``)."""
        return bool(self._config.bf16.enabled and self._config.bf16.bf16_optimizer_states)

    def torch_autocast_enabled(self) -> bool:
        """Whether forward runs under ``torch.autocast`` (``torch_autocast.enabled``)."""
        return self._autocast.enabled

    def torch_autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype (None when ``torch_autocast`` is off)."""
        return self._autocast.dtype

    def torch_autocast_lower_precision_safe_modules(self) -> list[str]:
        """``torch_autocast.lower_precision_safe_modules``, DeepSpeed's default when unset."""
        from shardwise.engine.autocast import DEFAULT_SAFE_MODULES

        names = self._config.torch_autocast.lower_precision_safe_modules
        return list(DEFAULT_SAFE_MODULES if names is None else names)

    def gradient_clipping(self) -> float:
        """The global-norm clipping threshold (0: off)."""
        return self._config.gradient_clipping

    def steps_per_print(self) -> int | None:
        """How often the step log prints."""
        return self._config.steps_per_print

    def wall_clock_breakdown(self) -> bool:
        """Whether forward/backward/step timings are logged."""
        return self._config.wall_clock_breakdown

    @property
    def mpu(self) -> Any:
        """The model-parallel unit: the one passed to ``initialize(mpu=...)``, else one answering for this grid."""
        if getattr(self, "_mpu", None) is None:
            from shardwise.tp.mpu import ModelParallelUnit

            self._mpu = ModelParallelUnit(self.topology)
        return self._mpu

    @mpu.setter
    def mpu(self, value: Any) -> None:
        self._mpu = value

    @property
    def local_rank(self) -> int:
        """Rank of this process on its node."""
        return comm.get_local_rank()

    @property
    def global_rank(self) -> int:
        """Rank of this process in the job."""
        return comm.get_rank()

    @property
    def world_size(self) -> int:
        """Number of ranks in the job."""
        return self.topology.world_size

    @property
    def dp_world_size(self) -> int:
        """Data-parallel degree (the batch arithmetic's data-parallel size)."""
        return self.topology.size("dp")

    @property
    def mp_world_size(self) -> int:
        """Tensor-parallel degree."""
        return self.topology.size("tp")

    @property
    def sequence_parallel_grads_averaged(self) -> bool:
        """Whether gradients are averaged (not summed) over the sequence-parallel ranks: ZeRO-3 with sp > 1.

        [Note: sequence-parallel gradient reduction] Sequence-parallel ranks hold different tokens of the same
        samples, so the gradient of a batch is the *sum* of theirs; DeepSpeed 0.19 sums over them and averages over
        data-parallel ranks with ZeRO 0-2 (it divides by the data x sequence group size / sp). Its ZeRO-3 averages
        over both until 0.20.2 (deepspeedai/DeepSpeed#8854), and Hugging Face Trainer compensates by scaling the
        loss by sp under ZeRO-3 with DeepSpeed < 0.20.2. shardwise mirrors 0.19 so that Trainer is right under every
        stage; ``shardwise.sp.sequence_parallel_mean(..., engine)`` reads this flag to give the matching gradient.
        """
        return self.zero_optimization_stage() == 3 and self.topology.size("sp") > 1

    @property
    def device(self) -> torch.device:
        """The device this rank computes on."""
        return get_accelerator().device()

    def get_lr(self) -> list[float]:
        """Current learning rate of every optimizer group."""
        return [g["lr"] for g in self.optimizer.param_groups] if self.optimizer is not None else []

    def get_global_grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step (unscaled, before clipping)."""
        return self._global_grad_norm

    def get_loss_scale(self) -> float:
        """Current loss scale (1 unless fp16)."""
        return self.scaler.scale

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients, master weights and optimizer states."""
        return self.strategy.memory_breakdown() if self.strategy is not None else {}

    # -- gradient accumulation boundary -----------------------------------------------------------------------------
    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the current micro-step ends an accumulation window (the optimizer steps after it)."""
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool | None) -> None:
        """Force (or, with None, stop forcing) the boundary decision, as DeepSpeed allows."""
        self._boundary_override = is_boundary

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally without communication (stages 0 and 1 only, as DeepSpeed)."""
        if self.zero_optimization_stage() >= 2:
            raise EngineUsageError(
                f"no_sync() is not compatible with ZeRO stage {self.zero_optimization_stage()}: gradients are "
                "partitioned during backward; use gradient_accumulation_steps instead"
            )
        previous, self._in_no_sync = self._in_no_sync, True
        try:
            yield
        finally:
            self._in_no_sync = previous

    # -- training -------------------------------------------------------------------------------------------------
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Run the wrapped module."""
        if self._step_started is None:
            self._step_started = time.perf_counter()
        if self._config.fp16.enabled and self._config.fp16.auto_cast:
            inputs = cast_inputs_half(inputs)  # positional inputs only, as DeepSpeed
        kwargs = self._data_efficiency_kwargs(kwargs)  # legacy curriculum_seqlen, random-LTD schedule step
        with self.timers("forward"), self._autocast():
            if self.strategy is None:
                output = self.module(*inputs, **kwargs)
            else:
                self.strategy.before_forward()
                with self.strategy.forward_context():
                    output = self.module(*inputs, **kwargs)
        return self._plain_backward.wrap_outputs(output)  # plain loss.backward() (engine/backward_hooks.py)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backpropagate ``loss``: scaled by 1/gradient_accumulation_steps and by the fp16 loss scale."""
        if self.strategy is None:
            raise RuntimeError("backward() needs an optimizer: pass one to initialize() or set `optimizer` in config")
        if not loss.requires_grad:
            raise ValueError("backward() got a loss that does not require grad; was it computed under no_grad()?")
        if self._step_started is None:
            self._step_started = time.perf_counter()
        self._nonfinite.on_loss(self.step_log.record_loss(loss), self.global_steps + 1, self.micro_steps)
        scaled = loss
        if scale_wrt_gas and self.gradient_accumulation_steps() > 1:
            scaled = scaled / self.gradient_accumulation_steps()
        if self.scaler.scale != 1.0:
            scaled = scaled * self.scaler.scale
        reduce = self.is_gradient_accumulation_boundary() and not self._in_no_sync
        with self.timers("backward"):
            self.strategy.begin_backward(reduce)
            self._plain_backward.engine_backward = True
            try:
                scaled.backward(retain_graph=retain_graph)
            finally:
                self._plain_backward.engine_backward = False
            self.strategy.end_backward()
        return loss

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current fp16 loss scale, for ``engine.scale(loss).backward()`` (plain backward under
        fp16; ``engine/backward_hooks.py``)."""
        return self._plain_backward.scale(loss)

    def step(self, lr_kwargs: dict[str, Any] | None = None) -> None:
        """At an accumulation boundary: reduce, clip, update, schedule, zero; otherwise just count the micro-step."""
        if self.strategy is None:
            raise RuntimeError("step() needs an optimizer: pass one to initialize() or set `optimizer` in config")
        if self._in_no_sync:  # every rank inside no_sync() raises here, before any collective (as DeepSpeed)
            raise EngineUsageError("It is illegal to call Engine.step() inside no_sync context manager: gradients "
                                   "accumulated there are not reduced yet. Call step() after the `with` block")
        if self.is_gradient_accumulation_boundary():
            with self.timers("step"):
                self._take_model_step(lr_kwargs or {})
        self.micro_steps += 1

    def _take_model_step(self, lr_kwargs: dict[str, Any]) -> None:
        self.strategy.finish_gradients()
        check_unused_parameters(self)
        model_parallel.sync_sequence_parallel_grads(self.strategy, self.module, self.topology)
        norm = self._global_norm()
        scale = self._grad_scale_factor()
        overflow = self._nonfinite.on_norm(norm, self.global_steps + 1)  # the same on every rank: norm is reduced
        self._record_overflow(overflow)
        if overflow:
            self.skipped_steps += 1
            self.scaler.update(True)
            log_dist(f"step {self.global_steps + 1}: gradient overflow (norm {norm}); skipping the update, "
                     f"loss scale now {self.scaler.scale:g} (skipped so far: {self.skipped_steps})", ranks=[0])
        else:
            true_norm = norm * scale
            clip = self._config.gradient_clipping
            coef = min(1.0, clip / (true_norm + 1e-6)) if clip and clip > 0 else 1.0
            self.strategy.scale_grads(scale * coef)
            self.strategy.optimizer_step()
            self.scaler.update(False)
            self._global_grad_norm = true_norm
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**lr_kwargs)
        self.strategy.zero_grad()
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        self._step_started = None
        extras = {"scale": f"{self.scaler.scale:g}"} if self.fp16_enabled() else {}
        if self.skipped_steps:
            extras["skipped"] = self.skipped_steps
        if self._nonfinite.steps:
            extras["nonfinite"] = self._nonfinite.steps
        lr = self.get_lr()[0] if self.get_lr() else 0.0
        self.step_log.on_step(self.global_steps, lr, elapsed, extras)
        self._observer.after_step()
        if self.wall_clock_breakdown() and self._config.steps_per_print and \
                self.global_steps % self._config.steps_per_print == 0:
            times = " | ".join(f"{k} {v:.1f} ms" for k, v in self.timers.summary_ms().items())
            log_dist(f"time (last {self._config.steps_per_print} steps): {times}", ranks=[0])
            self.timers.reset()

    def _grad_scale_factor(self) -> float:
        """Multiplier turning summed, loss-scaled gradients into averaged, unscaled ones."""
        factor = 1.0 / self.scaler.scale
        if self._config.gradient_allreduce_op != "sum":
            ranks = self.topology.zero_group.size  # summed over data x sequence ranks
            if not self.sequence_parallel_grads_averaged:
                ranks //= self.topology.size("sp")  # [Note: sequence-parallel gradient reduction]
            factor /= ranks
        return factor

    def _global_norm(self) -> float:
        """Norm of the summed (still scaled) gradients over every rank of the grid.

        Each rank contributes the squared norm of the gradients it owns, minus those of ``_norm_excluded_params()``
        (copies counted elsewhere); then one all-reduce sums over the ZeRO group (if partitioned) and one over the
        model-parallel (pp x tp) group.
        """
        norm_sq = self.strategy.local_grad_norm_sq().to(torch.float64)
        excluded = self._norm_excluded_params()
        if excluded:
            norm_sq = norm_sq - model_parallel.grad_norm_sq(self.strategy, excluded)
        if self.strategy.norm_is_partitioned:
            comm.all_reduce(norm_sq, group=self.topology.zero_group)
        comm.all_reduce(norm_sq, group=self.topology.model_parallel_group)
        value = norm_sq.item()
        return math.sqrt(max(value, 0.0)) if math.isfinite(value) else float("nan")

    def _norm_excluded_params(self) -> list[nn.Parameter]:
        """Parameters whose gradients this rank must not count in the global norm: on tensor-parallel ranks other
        than 0, the weights replicated across the tensor group (no ``tensor_model_parallel`` attribute)."""
        if self.topology.size("tp") > 1 and self.topology.coord("tp") > 0:
            return model_parallel.replicated_params(self.module)
        return []

    # -- checkpoints (the format and its rules live in shardwise/checkpoint/) -------------------------------------
    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """Save module, optimizer, scheduler, loss scaler, counters, RNG and ``client_state`` under ``save_dir/tag``."""
        from shardwise.checkpoint.engine import save_checkpoint

        return save_checkpoint(self, save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest,
                               exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[str | None, dict]:
        """Load a checkpoint saved by any layout into this one; returns ``(load_path, client_state)``."""
        from shardwise.checkpoint.engine import load_checkpoint

        return load_checkpoint(self, load_dir, tag=tag, load_module_strict=load_module_strict,
                               load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                               custom_load_fn=custom_load_fn)

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """Write the full model weights in the training dtype (one file, rank 0)."""
        from shardwise.checkpoint.engine import save_16bit_model

        return save_16bit_model(self, save_dir, save_filename, exclude_frozen_parameters)

    def zero_grad(self) -> None:
        """Drop accumulated gradients (the step does this itself)."""
        if self.strategy is not None:
            self.strategy.zero_grad()

    def destroy(self) -> None:
        """Finish any asynchronous checkpoint, then detach hooks so the module can be used without the engine."""
        from shardwise.checkpoint import wait_for_checkpoint

        wait_for_checkpoint(self)
        self._observer.close()
        if self.strategy is not None:
            self.strategy.remove_hooks()

    def __repr__(self) -> str:
        return f"Engine({self.strategy.describe() if self.strategy else 'no optimizer'}; {self.topology.describe()})"


def _log_build(engine: Engine) -> None:
    """Summarise the built engine on rank 0."""
    cfg = engine.config
    logger.debug("engine config: %s", cfg)
    log_dist(
        f"engine ready: {engine.strategy.describe() if engine.strategy else 'no optimizer'}; "
        f"{engine.topology.describe()}; batch {cfg.train_batch_size} = micro {cfg.train_micro_batch_size_per_gpu} x "
        f"accumulation {cfg.gradient_accumulation_steps} x data-parallel {engine.dp_world_size}",
        ranks=[0],
    )
