"""``ShardingStrategy``: the contract between the engine and whatever shards its model states.

The engine, the pipeline engine, checkpointing (``checkpoint/``), the ZeRO inspection helpers
(``utils/zero_inspect.py``) and model-parallel gradient bookkeeping (``engine/model_parallel.py``) talk to a
strategy only through these members. Two implementations exist, both built by ``engine/build.py``:

* ``zero.flat_strategy.FlatStrategy``: data parallelism, ZeRO stages 1 and 2 and the BF16 optimizer (flat buffers);
* ``zero.stage3.Stage3Strategy``: ZeRO stage 3 (parameters partitioned and gathered per unit).

Their shared behaviour (hooks, memory accounting, which ranks hold state) lives once, in
``zero.strategy_base.StrategyBase``. The protocol is structural: it is what readers type against, and
``isinstance(obj, ShardingStrategy)`` checks that an object has every member.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from shardwise.comm.group import Group
    from shardwise.zero.flat_optimizer import FlatOptimizer
    from shardwise.zero.fragments import Fragment
    from shardwise.zero.policy import ZeroPolicy


@runtime_checkable
class ShardingStrategy(Protocol):
    """What one training step, checkpointing and inspection need from a sharding strategy."""

    name: str
    """For logs: "ZeRO-2", "data parallel", ..."""
    policy: ZeroPolicy
    """The resolved stage decisions (partitioning, gradient dtype, buckets, offload)."""
    group: Group
    """The ZeRO (data-parallel) group the strategy shards over."""
    optimizer: FlatOptimizer
    """The wrapper around the user's optimizer (``.basic``) that steps flat partitions."""

    # -- one training step, in call order -------------------------------------------------------------------------
    def before_forward(self) -> None:
        """Prepare for a forward pass (ZeRO-3: gather what stays gathered)."""

    def forward_context(self) -> AbstractContextManager[None]:
        """Context the module's forward runs in (ZeRO-3: catches external parameter use)."""

    def begin_backward(self, boundary: bool) -> None:
        """Arm gradient capture; ``boundary``: this backward ends a gradient-accumulation window."""

    def end_backward(self) -> None:
        """Launch any reduction that backward did not trigger."""

    def finish_gradients(self) -> None:
        """Wait until reduced gradients are in place."""

    def local_grad_norm_sq(self) -> torch.Tensor:
        """Squared norm of the gradients this rank owns."""

    @property
    def norm_is_partitioned(self) -> bool:
        """Whether the norm must be summed over the ZeRO group."""

    def scale_grads(self, factor: float) -> None:
        """Averaging, loss-unscaling and clipping in one multiply."""

    def optimizer_step(self) -> None:
        """Update the owned weights and republish them."""

    def publish_weights(self) -> None:
        """Make the model's weights current from the fp32 masters (after a load)."""

    def zero_grad(self) -> None:
        """Start a new accumulation window."""

    def unused_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that received no gradient since the last step (empty where not tracked)."""

    def accumulated_grad(self, param: nn.Parameter) -> torch.Tensor:
        """``param``'s local, not yet reduced gradient (raises where the strategy keeps none)."""

    # -- setup and teardown -------------------------------------------------------------------------------------
    def sync_initial_weights(self, src: int) -> set[int]:
        """Make this strategy's parameters equal to global rank ``src``'s; returns the ids of the parameters done."""

    def remove_hooks(self) -> None:
        """Detach from autograd and the module (``engine.destroy()``)."""

    # -- state access (checkpoints, safe_get_* helpers) ----------------------------------------------------------
    @property
    def state_group(self) -> Group:
        """Ranks whose fragments together cover every parameter."""

    @property
    def grad_reduce_size(self) -> int:
        """Replicas whose gradients are summed in ``Fragment.grad`` (the engine divides at the step)."""

    def fragments(self, param: nn.Parameter) -> list[Fragment]:
        """This rank's pieces of ``param``'s master values, gradient and optimizer state."""

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds for model states, by kind."""

    def describe(self) -> str:
        """One line for the log."""
