"""Precision blocks: ``fp16``, ``bf16`` (alias ``bfloat16``), ``amp``, ``torch_autocast`` and ``data_types``.

Defaults are DeepSpeed 0.19's (``bf16.check_grad_overflow`` true). Dtype values are folded to "fp32" / "fp16" /
"bf16" whatever spelling DeepSpeed accepts ("bfloat16", "torch.float16", ...), so readers compare short names.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ConfigDict

from .schema_base import Bool, Dtype, Int, NonNegFloat, Section, Str


class FP16Config(Section):
    """``fp16``: float16 mixed precision with (by default dynamic) loss scaling."""

    enabled: Bool = False
    """Train in float16 with fp32 master weights."""
    auto_cast: Bool = False
    """Cast floating-point inputs of the forward pass to float16."""
    loss_scale: NonNegFloat = 0.0
    """Static loss scale; 0 selects dynamic loss scaling."""
    initial_scale_power: Int = 16
    """Dynamic scaling starts at 2**initial_scale_power."""
    loss_scale_window: Int = 1000
    """Steps without overflow before the dynamic scale is raised."""
    hysteresis: Int = 2
    """Overflows tolerated before the dynamic scale is lowered."""
    consecutive_hysteresis: Bool = False
    """Refill the hysteresis budget after every step without overflow."""
    min_loss_scale: Int = 1
    """Lower bound of the dynamic loss scale."""
    fp16_master_weights_and_grads: Bool = False
    """Keep master weights and gradients in fp16 (ZeRO stage 1-3 with a CPU optimizer only)."""


class BF16Config(Section):
    """``bf16`` (or legacy ``bfloat16``): bfloat16 mixed precision; no loss scaling."""

    enabled: Bool = False
    """Train in bfloat16."""
    immediate_grad_update: Bool = False
    """Accumulate into the fp32 gradients right after each backward instead of at the step."""
    check_grad_overflow: Bool = True
    """Skip the step when gradients contain inf/nan (new in DeepSpeed 0.19; default true)."""
    bf16_master_weights_and_grads: Bool = False
    """Keep master weights and gradients in bf16 (ZeRO stage 1-3 only)."""
    bf16_optimizer_states: Bool = False
    """Keep optimizer states in bf16 (needs bf16_master_weights_and_grads)."""


class AmpConfig(Section):
    """``amp``: NVIDIA apex automatic mixed precision. Other keys are apex ``amp.initialize`` arguments."""

    model_config = ConfigDict(extra="allow")
    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Use apex AMP (incompatible with ZeRO)."""

    @property
    def params(self) -> dict[str, Any]:
        """The apex ``amp.initialize`` keyword arguments (every key except ``enabled``)."""
        return dict(self.model_extra or {})


class TorchAutocastConfig(Section):
    """``torch_autocast``: wrap the forward pass in ``torch.autocast`` (DeepSpeed 0.17+)."""

    ds_strict: ClassVar[bool] = False

    enabled: Bool = False
    """Run the forward pass under torch.autocast."""
    dtype: Dtype | None = None
    """Autocast dtype ("bf16" or "fp16"); null means the accelerator's default."""
    lower_precision_safe_modules: list[Str] | None = None
    """Module classes whose parameters may be kept in the lower precision."""


class DataTypesConfig(Section):
    """``data_types``: dtypes of gradient accumulation, parameters and buffers."""

    ds_strict: ClassVar[bool] = False

    grad_accum_dtype: Dtype | None = None
    """Dtype gradients are accumulated in; null lets the engine choose (fp32 with bf16 and no ZeRO)."""
    param_dtype: Dtype | None = None
    """Dtype parameters are converted to (DeepSpeed 0.19); null keeps the model's dtype."""
    buffer_dtype: Dtype | None = None
    """Dtype buffers are converted to (DeepSpeed 0.19); null keeps their loaded dtype."""
