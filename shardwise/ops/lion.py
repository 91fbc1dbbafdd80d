"""Lion optimizer (``deepspeed.ops.lion``: ``FusedLion``, ``DeepSpeedCPULion``), in torch ``_foreach`` ops.

Lion ("Symbolic Discovery of Optimization Algorithms", Chen et al., 2023) keeps one moment and
steps by its sign:

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

Elementwise, so it is correct on flat ZeRO partitions. One class serves both of DeepSpeed's names:
the ``_foreach`` ops run multi-threaded on CPU and as a handful of kernels on accelerators.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Lion(torch.optim.Optimizer):
    """Lion with DeepSpeed's arguments: ``lr=1e-3, betas=(0.9, 0.99), weight_decay=0``."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {tuple(betas)}: each must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, moms = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype))
                moms.append(state["exp_avg"])
            if params:
                self._update(params, grads, moms, group)
        return loss

    @staticmethod
    def _update(params: list, grads: list, moms: list, group: dict) -> None:
        lr, wd = float(group["lr"]), group["weight_decay"]
        beta1, beta2 = group["betas"]
        direction = torch._foreach_lerp(moms, grads, 1.0 - beta1)  # beta1 * m + (1 - beta1) * g
        torch._foreach_sign_(direction)
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, direction, alpha=-lr)
        torch._foreach_lerp_(moms, grads, 1.0 - beta2)


FusedLion = Lion
DeepSpeedCPULion = Lion

__all__ = ["DeepSpeedCPULion", "FusedLion", "Lion"]
