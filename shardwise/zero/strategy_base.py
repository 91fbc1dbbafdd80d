"""``StrategyBase``: what every sharding strategy does the same way (hooks, memory accounting, state ranks).

The contract the engine types against is ``engine/strategy.py``'s ``ShardingStrategy``; the two implementations
(``flat_strategy.FlatStrategy``, ``stage3.Stage3Strategy``) derive from this class and add only what differs.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from shardwise.comm.group import Group
from shardwise.zero.flat_optimizer import FlatOptimizer
from shardwise.zero.fragments import Fragment
from shardwise.zero.policy import ZeroPolicy


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes of ``t`` (0 for None)."""
    return 0 if t is None else t.numel() * t.element_size()


class StrategyBase(abc.ABC):
    """Shared members of the sharding strategies; subclasses set the attributes below in ``__init__``."""

    name: str
    policy: ZeroPolicy
    group: Group
    optimizer: FlatOptimizer
    _hooks: list[Any]

    # -- defaults that only ZeRO-3 overrides ---------------------------------------------------------------------
    def before_forward(self) -> None:  # noqa: B027 - a default, overridden by ZeRO-3 only
        """Nothing to prepare: the parameters are whole on every rank."""

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Forward runs as it is."""
        yield

    def unused_parameters(self) -> list[nn.Parameter]:
        """Not tracked by default."""
        return []

    def accumulated_grad(self, param: nn.Parameter) -> torch.Tensor:
        """No local full gradient is kept by default."""
        raise RuntimeError(f"{self.name} keeps no local, unreduced gradient of a parameter "
                           f"(shape {tuple(param.shape)}); local gradients exist only with ZeRO stages 0 and 1")

    # -- shared ------------------------------------------------------------------------------------------------
    def local_grad_norm_sq(self) -> torch.Tensor:
        """Squared norm of the reduced gradients this rank owns."""
        return self.optimizer.local_norm_sq()

    def scale_grads(self, factor: float) -> None:
        """Averaging, loss-unscaling and clipping in one multiply."""
        self.optimizer.scale_grads(factor)

    def optimizer_step(self) -> None:
        """Step the fp32 masters and republish the weights (ZeRO-3: into the shards; persistent units refresh)."""
        self.optimizer.step()

    @property
    def norm_is_partitioned(self) -> bool:
        """Whether the norm must be summed over the ZeRO group (each rank owns a different part)."""
        return self.policy.partitioned

    @property
    def state_group(self) -> Group:
        """Ranks whose fragments together cover every parameter (size 1 when state is replicated)."""
        return self.group if self.policy.partitioned else Group("self", (self.group.global_rank(self.group.rank),))

    @property
    def grad_reduce_size(self) -> int:
        """Data-parallel replicas whose gradients are summed in ``Fragment.grad`` (the engine divides at the step)."""
        return self.group.size

    def remove_hooks(self) -> None:
        """Detach from autograd and the module (``engine.destroy()``)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds for model states, by kind."""
        params, grads, master = self._held_bytes()
        state = sum(tensor_bytes(v) for per_param in self.optimizer.basic.state.values()
                    for v in per_param.values() if torch.is_tensor(v) and v.numel() > 1)
        return {"parameters": params, "gradients": grads, "master_weights": master, "optimizer_states": state}

    # -- what each strategy answers itself -----------------------------------------------------------------------
    @abc.abstractmethod
    def _held_bytes(self) -> tuple[int, int, int]:
        """Bytes of (parameters, gradients, master weights) this rank holds."""

    @abc.abstractmethod
    def sync_initial_weights(self, src: int) -> set[int]:
        """Make this strategy's parameters equal to global rank ``src``'s; the ids of the parameters covered."""

    @abc.abstractmethod
    def fragments(self, param: nn.Parameter) -> list[Fragment]:
        """This rank's pieces of ``param``'s master values, gradient and optimizer state."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the log."""
