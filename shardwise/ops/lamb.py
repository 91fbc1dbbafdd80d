"""LAMB optimizer with DeepSpeed's ``FusedLamb`` arguments and update rule (``deepspeed.ops.lamb``).

Owns the layer-wise adaptive update of "Large Batch Optimization for Deep Learning" (You et al.,
2019) as DeepSpeed's kernel computes it, written with torch ops so it runs on any device:

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    u = m / (sqrt(v) + eps) + weight_decay * p        (eps_inside_sqrt: m / sqrt(v + eps) + ...)
    ratio = clamp(||p|| / ||u||, min_coeff, max_coeff), or 1 if either norm is 0
    p = p - step_size * ratio * u,   step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)

Bias correction is folded into ``step_size`` (not into m and v), so ``eps`` is not bias-corrected
and the trust ratio is measured on the uncorrected update, exactly as DeepSpeed does.

LAMB is not elementwise: the trust ratio needs the norm of each *whole* parameter tensor, so it is
not correct on an arbitrary flat ZeRO partition (see ``is_zero_supported_optimizer``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Lamb(torch.optim.Optimizer):
    """LAMB with DeepSpeed ``FusedLamb``'s signature; ``get_lamb_coeffs()`` returns the last ratios.

    ``max_grad_norm`` is accepted for signature compatibility only when 0 (the default); clip with
    the top-level ``gradient_clipping`` config key instead.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        amsgrad: bool = False,
    ) -> None:
        if amsgrad:
            raise ValueError("Lamb does not support amsgrad=True (neither does DeepSpeed's FusedLamb)")
        if max_grad_norm:
            raise ValueError(f"Lamb got max_grad_norm={max_grad_norm}; use the top-level 'gradient_clipping' "
                             "config key to clip gradients")
        if not 0.0 <= min_coeff <= max_coeff:
            raise ValueError(f"Lamb needs 0 <= min_coeff <= max_coeff, got {min_coeff} and {max_coeff}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, max_grad_norm=0.0, max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults)
        self.eps_inside_sqrt = bool(eps_inside_sqrt)
        self.lamb_coeffs: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.lamb_coeffs = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                self.lamb_coeffs.append(self._update(p, p.grad.to(p.dtype), state, group, beta1, beta2))
        return loss

    def _update(self, p, grad, state, group, beta1: float, beta2: float) -> torch.Tensor:
        step = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if self.eps_inside_sqrt:
            denom = (v + group["eps"]).sqrt_()
        else:
            denom = v.sqrt().add_(group["eps"])
        update = m / denom
        if group["weight_decay"] != 0:
            update.add_(p, alpha=group["weight_decay"])
        w_norm, u_norm = p.norm(), update.norm()
        ratio = (w_norm / u_norm).clamp_(group["min_coeff"], group["max_coeff"])
        ratio = torch.where((w_norm != 0) & (u_norm != 0), ratio, torch.ones_like(ratio))
        if group["bias_correction"]:
            step_size = group["lr"] * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
        else:
            step_size = group["lr"]
        p.sub_(update.mul_(ratio * step_size))
        return ratio

    def get_lamb_coeffs(self) -> list[float]:
        """Trust ratios used by the last ``step()``, one per updated parameter."""
        return [float(c) for c in self.lamb_coeffs]


FusedLamb = Lamb

__all__ = ["FusedLamb", "Lamb"]
