"""``deepspeed.ops.adagrad``: ``DeepSpeedCPUAdagrad``, Adagrad with its states on the host.

shardwise has no Adagrad kernel of its own: this is ``torch.optim.Adagrad`` (foreach, elementwise, so it is
correct on flat ZeRO partitions) under DeepSpeed's name and constructor."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class DeepSpeedCPUAdagrad(torch.optim.Adagrad):
    """DeepSpeed's CPU Adagrad signature; the update is ``torch.optim.Adagrad``'s."""

    def __init__(self, model_params: Iterable, lr: float = 1e-2, eps: float = 1e-10, weight_decay: float = 0.0,
                 amsgrad: bool = False, fp32_optimizer_states: bool = True) -> None:
        if amsgrad:
            raise ValueError("DeepSpeedCPUAdagrad: amsgrad=True is not an Adagrad option (DeepSpeed refuses it "
                             "too); pass amsgrad=False")
        super().__init__(model_params, lr=lr, eps=eps, weight_decay=weight_decay)
        self.fp32_optimizer_states = fp32_optimizer_states


__all__ = ["DeepSpeedCPUAdagrad"]
