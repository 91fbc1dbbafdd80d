"""Mixed precision: which dtype the model runs in, and fp16 loss scaling.

``DynamicLossScaler`` follows DeepSpeed 0.19's semantics (``fp16.loss_scale == 0``): start at
``2**initial_scale_power``; on an overflowed step, if hysteresis is exhausted halve the scale (never below
``min_loss_scale``), otherwise spend one unit of hysteresis; once ``loss_scale_window`` clean steps have passed
since the last overflow (DeepSpeed counts the step after the overflow as the start: the scale doubles at the
``loss_scale_window + 1``-th clean step, and every ``loss_scale_window`` steps after that) double it and refill
hysteresis. ``consecutive_hysteresis`` refills hysteresis after every clean step. An overflow with hysteresis
exhausted while the scale is already at ``min_loss_scale`` raises ``LossScaleError``, as DeepSpeed does ("cannot
decrease scale anymore"): training cannot make progress from there. A non-zero ``loss_scale`` is a static scale.
BF16 uses no scaling (scale 1), as DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from shardwise.config import ShardwiseConfig



def model_dtype(config: ShardwiseConfig) -> torch.dtype:
    """The dtype the model's weights are cast to: bf16, fp16, or fp32."""
    if config.bf16.enabled:
        return torch.bfloat16
    if config.fp16.enabled:
        return torch.float16
    return torch.float32


class LossScaleError(RuntimeError):
    """fp16 gradients still overflow at the minimum loss scale: the run cannot continue."""


@dataclass
class DynamicLossScaler:
    """fp16 loss scale with overflow back-off, hysteresis and periodic growth."""

    scale: float = 2.0**16
    window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    consecutive_hysteresis: bool = False
    factor: float = 2.0
    dynamic: bool = True
    raise_at_min_scale: bool = True

    def __post_init__(self) -> None:
        self._hysteresis_left = self.hysteresis
        self._iteration = 0
        self._last_overflow = -1
        self.overflows = 0

    @classmethod
    def from_config(cls, fp16: Any) -> DynamicLossScaler:
        """Build from the ``fp16`` config section (static when ``loss_scale`` > 0)."""
        if fp16.loss_scale and fp16.loss_scale > 0:
            return cls(scale=float(fp16.loss_scale), dynamic=False)
        return cls(scale=2.0 ** fp16.initial_scale_power, window=fp16.loss_scale_window,
                   hysteresis=fp16.hysteresis, min_scale=float(fp16.min_loss_scale),
                   consecutive_hysteresis=fp16.consecutive_hysteresis)

    def update(self, overflow: bool) -> None:
        """Record one optimizer step's outcome and adjust the scale."""
        if overflow:
            self.overflows += 1
        if not self.dynamic:
            self._iteration += 1
            return
        if overflow:
            if self.hysteresis == 1 or self._hysteresis_left <= 1:
                if self.scale <= self.min_scale and self.raise_at_min_scale:
                    raise LossScaleError(
                        f"fp16 gradients overflowed at the minimum loss scale ({self.min_scale:g}) after "
                        f"{self.overflows} overflow(s) in {self._iteration + 1} steps: the model produces inf/nan "
                        "gradients at any scale. Lower the learning rate, check the data and the loss for inf/nan, "
                        "lower fp16.min_loss_scale, or train in bf16"
                    )
                self.scale = max(self.scale / self.factor, self.min_scale)
            else:
                self._hysteresis_left -= 1
            self._last_overflow = self._iteration
        else:
            if self.consecutive_hysteresis:
                self._hysteresis_left = self.hysteresis
            stable = self._iteration - self._last_overflow - 1  # clean steps before this one since the overflow
            if stable > 0 and stable % self.window == 0:
                if not self.consecutive_hysteresis:
                    self._hysteresis_left = self.hysteresis
                self.scale *= self.factor
        self._iteration += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume scaling exactly."""
        return {"scale": self.scale, "hysteresis_left": self._hysteresis_left, "iteration": self._iteration,
                "last_overflow": self._last_overflow, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output."""
        self.scale = float(state["scale"])
        self._hysteresis_left = int(state["hysteresis_left"])
        self._iteration = int(state["iteration"])
        self._last_overflow = int(state["last_overflow"])
        self.overflows = int(state.get("overflows", 0))


class NoScaler:
    """Loss scale 1 (fp32 and bf16)."""

    scale = 1.0
    dynamic = False
    overflows = 0

    def update(self, overflow: bool) -> None:  # noqa: D102 - nothing to adjust
        if overflow:
            self.overflows += 1

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"scale": 1.0, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.overflows = int(state.get("overflows", 0))


def cast_inputs_half(inputs: Any) -> Any:
    """``fp16.auto_cast``: floating-point tensors in ``inputs`` (nested lists, tuples, dicts) cast to float16.

    Integer tensors (token ids, masks) and non-tensors are left alone, as DeepSpeed does for the positional
    forward inputs.
    """
    if isinstance(inputs, (list, tuple)):
        return inputs.__class__(cast_inputs_half(v) for v in inputs)
    if isinstance(inputs, dict):
        return {k: cast_inputs_half(v) for k, v in inputs.items()}
    if torch.is_tensor(inputs) and inputs.is_floating_point():
        return inputs.half()
    return inputs


def make_scaler(config: ShardwiseConfig) -> DynamicLossScaler | NoScaler:
    """The loss scaler for this config."""
    if config.fp16.enabled:
        return DynamicLossScaler.from_config(config.fp16)
    if config.torch_autocast.enabled:  # fp16 autocast over wider weights: a GradScaler-like scale (engine/autocast.py)
        from shardwise.accelerator import get_accelerator
        from shardwise.engine.autocast import autocast_dtype

        if autocast_dtype(config, get_accelerator().device().type) == torch.float16:
            return DynamicLossScaler(scale=2.0**16, window=2000, hysteresis=1, raise_at_min_scale=False)
    return NoScaler()
