"""Step-time guards: decisions every rank must take identically, and failures that must be loud, not silent.

- **Non-finite loss and gradients**. A NaN/inf loss or global gradient norm is logged the first time it happens, on
  every rank that sees it, with the rank and step (an fp16 gradient overflow is routine: the engine's loss-scale
  log reports it). Whether the step is then skipped (no update, optimizer state and LR schedule untouched) is
  :func:`skips_nonfinite`: fp16 always (loss scaling), bf16 per ``bf16.check_grad_overflow`` (DeepSpeed 0.19,
  default true), fp32 per shardwise's own top-level ``check_grad_overflow`` (default off: DeepSpeed applies the
  update and the weights turn NaN). The decision uses the all-reduced norm, so every rank skips or steps together.
- **Unused parameters** (``zero_optimization.ignore_unused_parameters: false``): DeepSpeed raises at the step of
  ZeRO-1/2 with CPU offload when a trainable parameter got no gradient, but only on the rank whose partition holds
  it, so the other ranks wait forever in the next collective. Here the count is all-reduced first, and every rank
  raises the same error naming the parameters.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from shardwise import comm
from shardwise.accelerator import get_accelerator
from shardwise.common.logging import logger

if TYPE_CHECKING:
    from shardwise.config import ShardwiseConfig
    from shardwise.engine.engine import Engine



class UnusedParametersError(RuntimeError, AssertionError):
    """Trainable parameters got no gradient while ``ignore_unused_parameters`` is false (an AssertionError too, as
    DeepSpeed raises)."""


def skips_nonfinite(config: ShardwiseConfig) -> bool:
    """Whether a step whose global gradient norm is inf/nan is skipped (see the module docstring)."""
    if config.fp16.enabled:
        return True
    flag = getattr(config, "check_grad_overflow", None)
    if config.bf16.enabled:
        return bool(config.bf16.check_grad_overflow) if flag is None else bool(flag)
    return bool(flag)


def _advice(config: ShardwiseConfig) -> str:
    if skips_nonfinite(config):
        return "the optimizer step is skipped (no update; optimizer state and LR schedule unchanged)"
    key = "bf16.check_grad_overflow" if config.bf16.enabled else '"check_grad_overflow": true'
    return (f"the optimizer step applies it, so the weights become NaN/inf (as in DeepSpeed); set {key} to skip such "
            "steps instead, and check the data, the loss and the learning rate")


class NonFiniteMonitor:
    """Remembers whether the loss or the norm has been non-finite before, so only the first time is loud."""

    def __init__(self, config: ShardwiseConfig) -> None:
        self.config = config
        self.losses = 0  # micro-batches with a non-finite loss
        self.steps = 0  # optimizer steps with a non-finite global gradient norm

    def on_loss(self, value: float, step: int, micro_step: int) -> None:
        """After each backward: ``value`` is the micro-batch loss (already a Python float for the step log)."""
        if math.isfinite(value):
            return
        self.losses += 1
        if self.losses == 1:
            logger.warning("[rank %d] step %d (micro-step %d): the loss is %s. If the gradients are non-finite too, "
                           "%s.", comm.get_rank(), step, micro_step, value, _advice(self.config))

    def on_norm(self, norm: float, step: int) -> bool:
        """At the step, with the all-reduced global norm: True when the update must be skipped."""
        if math.isfinite(norm):
            return False
        self.steps += 1
        if self.steps == 1 and not self.config.fp16.enabled:  # fp16 overflows are routine: the loss scale backs off
            logger.warning("[rank %d] step %d: the global gradient norm is %s: %s.", comm.get_rank(), step, norm,
                           _advice(self.config))
        return skips_nonfinite(self.config)


def check_unused_parameters(engine: Engine) -> None:
    """At an optimizer step of ZeRO-1/2 with optimizer offload and ``ignore_unused_parameters: false``: raise
    UnusedParametersError on every rank if any rank has a trainable parameter that got no gradient."""
    zc = engine.config.zero_optimization
    if zc.ignore_unused_parameters or zc.stage not in (1, 2) or zc.offload_optimizer_device == "none":
        return
    unused = engine.strategy.unused_parameters() if engine.strategy is not None else []
    count = torch.tensor([len(unused)], dtype=torch.int64, device=get_accelerator().device())
    comm.all_reduce(count, op=comm.ReduceOp.MAX)
    if int(count.item()) == 0:
        return
    names = {id(p): n for n, p in engine.module.named_parameters()}
    mine = [names.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in unused]
    per_rank = comm.all_gather_object(mine)
    detail = "; ".join(f"rank {r}: {', '.join(n[:6])}{' ...' if len(n) > 6 else ''}"
                       for r, n in enumerate(per_rank) if n)
    raise UnusedParametersError(
        "trainable parameters received no gradient in this step while zero_optimization.ignore_unused_parameters "
        f"is false ({detail}). Fix: set \"ignore_unused_parameters\": true in zero_optimization, make every "
        "trainable parameter take part in the loss, or set requires_grad=False on the unused ones")
