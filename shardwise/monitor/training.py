"""The engine's side of observability: which monitor events a training step writes, and when; the flops
profiler's step; the per-rank memory table. The engine calls ``TrainingObserver(engine)`` once, ``after_step()``
at the end of every optimizer step, and ``close()`` from ``destroy()``; everything else lives here.

Events (DeepSpeed 0.19's names; every value keyed by ``engine.global_samples`` after the step, on rank 0):

* every optimizer step: ``Train/Samples/train_loss`` (the step's loss averaged over its micro-batches and the
  ranks, as the step log averages it; DeepSpeed writes it only from the pipeline engine), ``Train/Samples/lr``,
  and ``Train/Samples/loss_scale`` with fp16;
* every optimizer step with ``wall_clock_breakdown`` or ``flops_profiler`` on:
  ``Train/Samples/elapsed_time_ms_forward``, ``..._backward`` and ``..._step``: the step's own times, summed over its
  micro-batches, as DeepSpeed's global timers (``backward_inner`` / ``backward_allreduce`` are not written: gradient
  reduction overlaps the backward here and is not timed apart);
* every ``steps_per_print`` steps, from the step log's line: ``Train/Samples/samples_per_second`` (the window's
  throughput) and ``Train/Samples/peak_memory_MB`` (the highest per-rank peak of the window).

The loss average costs one all-reduce of two numbers per step, issued only when a monitor is enabled (every rank
knows that from the config, so all ranks take part).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from shardwise import comm
from shardwise.accelerator import get_accelerator
from shardwise.monitor.monitor import Event, MonitorMaster

if TYPE_CHECKING:
    from shardwise.engine.engine import Engine


PREFIX = "Train/Samples/"


class TrainingObserver:
    """Writes the step's events, runs the flops profiler at ``profile_step`` and prints the memory table."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        cfg = engine.config
        self.monitor = MonitorMaster(cfg)
        self._timed = bool(cfg.wall_clock_breakdown or cfg.flops_profiler.enabled)
        self._seen_ms: dict[str, float] = {}
        self.flops_profiler: Any = None
        self._profile_cfg = cfg.flops_profiler
        if cfg.flops_profiler.enabled and comm.get_rank() == 0:  # DeepSpeed profiles on rank 0 only
            from shardwise.profiling.flops_profiler import FlopsProfiler

            self.flops_profiler = FlopsProfiler(engine.module, ds_engine=engine,
                                                recompute_fwd_factor=cfg.flops_profiler.recompute_fwd_factor,
                                                peak_tflops=cfg.flops_profiler.peak_tflops)
            self._handles = [engine.module.register_forward_pre_hook(self._profile_start, prepend=True),
                             engine.module.register_forward_hook(self._profile_stop, always_call=True)]

    # -- the flops profiler's step ------------------------------------------------------------------------------------
    def _profiling_now(self) -> bool:
        return self._engine.global_steps == self._profile_cfg.profile_step

    def _profile_start(self, module: Any, args: Any) -> None:
        if self._profiling_now():
            self.flops_profiler.begin_forward()

    def _profile_stop(self, module: Any, args: Any, output: Any) -> None:
        self.flops_profiler.end_forward()

    def _report_profile(self, times_ms: dict[str, float], micro_batches: int) -> None:
        prof, cfg = self.flops_profiler, self._profile_cfg
        prof.record_step(times_ms.get("forward", 0.0) / 1e3, times_ms.get("backward", 0.0) / 1e3,
                         times_ms.get("step", 0.0) / 1e3, micro_batches)
        prof.print_model_profile(profile_step=cfg.profile_step, module_depth=cfg.module_depth,
                                 top_modules=cfg.top_modules, detailed=cfg.detailed, output_file=cfg.output_file)
        prof.end_profile()

    # -- after every optimizer step -----------------------------------------------------------------------------------
    def _step_times(self) -> tuple[dict[str, float], int]:
        """This step's milliseconds per timer (differences of the never-reset totals) and its micro-batches."""
        engine = self._engine
        if engine.timers.synchronize:
            get_accelerator().synchronize()
        now = engine.timers.lifetime_ms()
        times = {k: v - self._seen_ms.get(k, 0.0) for k, v in now.items()}
        self._seen_ms = now
        return times, engine.gradient_accumulation_steps()

    def _mean_loss(self) -> float:
        total, count = self._engine.step_log.step_loss
        both = torch.tensor([total, float(count)], dtype=torch.float64)
        comm.all_reduce(both)
        return (both[0] / both[1]).item() if both[1] > 0 else float("nan")

    def after_step(self) -> None:
        """Called by the engine after ``global_steps`` / ``global_samples`` count the finished step."""
        engine = self._engine
        times, micro = self._step_times()
        if self.flops_profiler is not None and engine.global_steps - 1 == self._profile_cfg.profile_step:
            self._report_profile(times, micro)
        if self.monitor.enabled:
            loss = self._mean_loss()
            if comm.get_rank() == 0:
                self.monitor.write_events(self._events(loss, times))
        self._memory_table()

    def _events(self, loss: float, times: dict[str, float]) -> list[Event]:
        engine = self._engine
        step = engine.global_samples
        lrs = engine.get_lr()
        events: list[Event] = [(PREFIX + "train_loss", loss, step), (PREFIX + "lr", lrs[0] if lrs else 0.0, step)]
        if engine.fp16_enabled():
            events.append((PREFIX + "loss_scale", engine.get_loss_scale(), step))
        if self._timed:
            events += [(f"{PREFIX}elapsed_time_ms_{name}", times.get(name, 0.0), step)
                       for name in ("forward", "backward", "step")]
        last = engine.step_log.last
        if last.get("step") == engine.global_steps:  # the step log printed this step
            events.append((PREFIX + "samples_per_second", last["samples_per_s"], step))
            events.append((PREFIX + "peak_memory_MB", max(last["peak_mem_mb"]), step))
        return events

    def _memory_table(self) -> None:
        engine = self._engine
        every = engine.config.steps_per_print
        if not engine.config.memory_breakdown or not every or engine.global_steps % every:
            return
        from shardwise.utils.memory import print_memory_breakdown

        peaks = engine.step_log.last.get("peak_mem_mb") or [0.0] * comm.get_world_size()
        print_memory_breakdown(engine, peaks[comm.get_rank()] * 2**20, title=f"memory at step {engine.global_steps}")

    def close(self) -> None:
        """Finish the monitors and detach the profiler's hooks."""
        self.monitor.close()
        for handle in getattr(self, "_handles", ()):
            handle.remove()
        self._handles = []
