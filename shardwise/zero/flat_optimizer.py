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
        if policy.use_master:
            for group, g in zip(basic.param_groups, groups):
                group["params"] = [g.master] if g is not None else []
            basic.state.clear()
        # shardwise's Adam takes 16-bit gradients as they are and, for an unpartitioned master, writes the
        # model's 16-bit weights in the same pass: no fp32 copy of the gradients, no separate cast afterwards
        self._fused_lowp = (policy.use_master and not policy.partitioned and hasattr(basic, "lowp_outs")
                            and not policy.offload_optimizer)
        if self._fused_lowp:
            for g in self.live_groups:
                basic.lowp_outs[id(g.master)] = g.flat
                if hasattr(g.master, "grad_dtype"):  # torch >= 2.9 checks .grad's dtype against the tensor's
                    g.master.grad_dtype = None

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
        """Sum of squared gradient elements this rank owns (fp32 for 16-bit grads, else their own dtype)."""
        grads = [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in self.owned_grads()]
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        return torch.stack([n.double() for n in torch._foreach_norm(grads, 2.0)]).pow(2).sum()

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
            if self._fused_lowp and grad.dtype in (torch.bfloat16, torch.float16, torch.float32):
                g.master.grad = grad  # the kernel reads 16-bit gradients directly
            else:
                g.master.grad = grad.to(device=g.master.device, dtype=g.master.dtype, non_blocking=True)
        self.basic.step()
        for g in self.live_groups:
            g.master.grad = None
        if not self._fused_lowp:
            self.publish()

    @torch.no_grad()
    def publish(self) -> None:
        """Make the model's weights current from the master copies (each group knows how: all-gather or copy)."""
        handles: list = []
        for g in self.live_groups:
            g.publish_master(self.comm_group, handles, self.policy.max_inflight)
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
