"""``FlatOptimizer``: runs the user's (or config's) torch optimizer on flat partitions and republishes weights.

With fp32 master weights (mixed precision or any partitioned stage) the wrapped optimizer's param groups are
rewired to one flat fp32 tensor per group — this rank's partition — so a single fused kernel updates the whole
group, and state is exactly 1/world of the model. After the step, the updated partition is cast to the model's dtype
and all-gathered bucket by bucket straight into the flat parameter buffer. Without a master copy (stage 0, fp32)
the optimizer keeps the model's own parameters, whose gradients are views of the reduced buffer.

This is DeepSpeed's ``DeepSpeedZeroOptimizer`` / ``BF16_Optimizer`` / ``FP16_Optimizer`` role, as one class.
"""

from __future__ import annotations

from typing import Any

import torch

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.zero.flat_buffer import FlatGroup
from shardwise.zero.policy import ZeroPolicy


class FlatOptimizer:
    """Optimizer step, gradient norm and weight publication over ``FlatGroup``s."""

    def __init__(self, basic: torch.optim.Optimizer, groups: list[FlatGroup | None], policy: ZeroPolicy,
                 comm_group: Group) -> None:
        self.basic = basic
        #: one entry per ``basic.param_groups`` entry; None where that group has no trainable parameter
        self.groups = groups
        self.policy = policy
        self.comm_group = comm_group
        live = [g for g in groups if g is not None]
        for g in live:
            if policy.partitioned:
                g.allocate_part_grad(policy.grad_dtype)
            if not policy.reduce_every_micro_step:
                g.allocate_full_grad(policy.grad_dtype, as_param_grads=policy.grads_are_param_views)
        if policy.use_master:
            device = torch.device("cpu") if policy.offload_optimizer else None
            for g in live:
                g.allocate_master(device or g.device, partitioned=policy.partitioned, pin=policy.pin_memory)
            for group, g in zip(basic.param_groups, groups):
                group["params"] = [g.master] if g is not None else []
            basic.state.clear()

    @property
    def live_groups(self) -> list[FlatGroup]:
        """Groups that hold trainable parameters."""
        return [g for g in self.groups if g is not None]

    # -- gradients --------------------------------------------------------------------------------------------------
    def owned_grads(self) -> list[torch.Tensor]:
        """The reduced gradients this rank steps on: its partitions, or the full buffers when not partitioned."""
        if self.policy.partitioned:
            return [g.part_grad for g in self.live_groups]
        return [g.full_grad for g in self.live_groups]

    def local_norm_sq(self) -> torch.Tensor:
        """Sum of squared gradient elements this rank owns (fp32; padding is zero and adds nothing)."""
        grads = self.owned_grads()
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in grads], 2.0)
        return torch.stack(norms).float().pow(2).sum()

    def scale_grads(self, factor: float) -> None:
        """Multiply every owned gradient by ``factor`` (averaging, loss-scale removal and clipping in one pass)."""
        if factor != 1.0:
            torch._foreach_mul_(self.owned_grads(), factor)

    def zero_grad(self) -> None:
        """Clear accumulated gradients for the next window (buffers are reused, never reallocated)."""
        for g in self.live_groups:
            if g.full_grad is not None:
                g.full_grad.zero_()
            if g.part_grad is not None and not self.policy.reduce_every_micro_step:
                g.part_grad.zero_()

    # -- step ---------------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Update the weights this rank owns, then make every rank's model weights current."""
        if not self.policy.use_master:
            self.basic.step()
            return
        for g in self.live_groups:
            grad = g.part_grad if self.policy.partitioned else g.full_grad
            g.master.grad = grad.to(device=g.master.device, dtype=torch.float32, non_blocking=True)
        self.basic.step()
        for g in self.live_groups:
            g.master.grad = None
        self.publish()

    @torch.no_grad()
    def publish(self) -> None:
        """Copy master weights into the model: all-gather of the updated partitions, bucket by bucket."""
        handles = []
        for g in self.live_groups:
            if not self.policy.partitioned:
                g.flat.copy_(g.master)
                continue
            for b in g.layout.buckets:
                shard = g.part_view(g.master, b.index).to(device=g.device, dtype=g.dtype, non_blocking=True)
                handles.append(comm.all_gather_into_tensor(g.bucket_view(g.flat, b.index), shard,
                                                           group=self.comm_group, async_op=True))
                if len(handles) > self.policy.max_inflight:
                    handles.pop(0).wait()
        for h in handles:
            h.wait()

    # -- torch.optim.Optimizer look-alike -----------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's groups (schedulers change ``lr`` here)."""
        return self.basic.param_groups

    @property
    def state(self) -> Any:
        """The wrapped optimizer's state (per master partition)."""
        return self.basic.state
