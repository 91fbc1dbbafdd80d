"""``FusedAdam``: DeepSpeed's default Adam/AdamW optimizer name, on any device.

Owns the mapping of DeepSpeed's ``deepspeed.ops.adam.FusedAdam`` (a CUDA multi-tensor kernel) onto
what exists here: the same update as :class:`~shardwise.ops.adam.cpu_adam.CPUAdam`, run by the C
kernel for fp32 CPU tensors and by torch's own fused kernels (``torch._fused_adam(w)_``, available
for CUDA, CPU, XPU and MPS tensors) everywhere else, with a ``_foreach`` fallback. Unlike
``CPUAdam`` it accepts parameters on any device and keeps ``exp_avg``/``exp_avg_sq`` in the
parameter's dtype, as DeepSpeed's FusedAdam does.
"""

from __future__ import annotations

from collections.abc import Iterable

from shardwise.ops.adam.cpu_adam import AdamBase


class FusedAdam(AdamBase):
    """Adam/AdamW with DeepSpeed's ``FusedAdam`` signature.

    Args:
        params: tensors or param-group dicts.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        bias_correction: apply Adam's bias correction (default True).
        adam_w_mode: ``True`` (default) for decoupled weight decay (AdamW), ``False`` for L2 (Adam).
        amsgrad: not supported; ``True`` raises ``ValueError``.
        set_grad_none: accepted for compatibility; ``zero_grad()`` sets grads to None by default.
    """

    fp32_optimizer_states = False

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adam_w_mode: bool = True,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        set_grad_none: bool = True,
    ) -> None:
        super().__init__(params, lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad, adamw_mode=adam_w_mode)
        self.set_grad_none = bool(set_grad_none)
