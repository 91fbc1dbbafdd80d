"""The step log: one line every ``steps_per_print`` optimizer steps with loss, lr, throughput, time and memory.

Loss is averaged over the window's micro-batches and the data-parallel ranks; peak memory is reported per rank
(accelerator peak; on CPU the process's peak resident set) and the peak window is reset after each line. Gathering
these costs one tiny all-gather per printed step, issued on every rank at the same step. ``step_loss`` keeps this
rank's loss sum and count of the last optimizer step alone, for the monitors (``monitor/training.py``); the CSV
files of ``csv_monitor`` are written by the monitors too.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from shardwise import comm
from shardwise.accelerator import get_accelerator
from shardwise.common.logging import logger


class StepLog:
    """Accumulates per-step facts and prints them on rank 0."""

    def __init__(self, steps_per_print: int | None, train_batch_size: int) -> None:
        self.every = steps_per_print or 0
        self.train_batch_size = train_batch_size
        self._loss_sum = 0.0
        self._loss_count = 0
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._step_time = 0.0
        self._step_loss_sum = 0.0
        self._step_loss_count = 0
        #: (loss sum, micro-batch count) of the last optimizer step on this rank
        self.step_loss: tuple[float, int] = (0.0, 0)
        self.last: dict[str, Any] = {}

    def record_loss(self, loss: torch.Tensor) -> float:
        """Add one micro-batch loss (detached, any dtype); returns it as a float."""
        value = float(loss.detach().float())
        self._loss_sum += value
        self._loss_count += 1
        self._step_loss_sum += value
        self._step_loss_count += 1
        return value

    def on_step(self, step: int, lr: float, step_seconds: float, extras: dict[str, Any]) -> None:
        """Called after every optimizer step; prints when ``step`` is a multiple of ``steps_per_print``."""
        self._window_steps += 1
        self._step_time += step_seconds
        self.step_loss = (self._step_loss_sum, self._step_loss_count)
        self._step_loss_sum, self._step_loss_count = 0.0, 0
        if not self.every or step % self.every:
            return
        acc = get_accelerator()
        local = torch.tensor([self._loss_sum, float(self._loss_count), float(acc.max_memory_allocated())],
                             dtype=torch.float64)
        world = comm.get_world_size()
        gathered = torch.zeros(world * 3, dtype=torch.float64)
        comm.all_gather_into_tensor(gathered, local)
        rows = gathered.view(world, 3)
        loss = (rows[:, 0].sum() / rows[:, 1].sum().clamp(min=1)).item()
        elapsed = time.perf_counter() - self._window_start
        samples_per_s = self.train_batch_size * self._window_steps / max(elapsed, 1e-9)
        step_ms = self._step_time / self._window_steps * 1e3
        peaks = [int(v) for v in rows[:, 2].tolist()]
        self.last = {"step": step, "loss": loss, "lr": lr, "samples_per_s": samples_per_s, "step_ms": step_ms,
                     "peak_mem_mb": [p / 2**20 for p in peaks], **extras}
        if comm.get_rank() == 0:
            mem = "/".join(f"{p / 2**20:.0f}" for p in peaks)
            extra = "".join(f" | {k} {v}" for k, v in extras.items())
            logger.info("step %d | loss %.4f | lr %.3e | %.1f samples/s | %.1f ms/step | peak mem/rank %s MB%s",
                        step, loss, lr, samples_per_s, step_ms, mem, extra)
        acc.reset_peak_memory_stats()
        self._loss_sum, self._loss_count, self._window_steps, self._step_time = 0.0, 0, 0, 0.0
        self._window_start = time.perf_counter()
