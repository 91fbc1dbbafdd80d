"""``FlatStrategy``: ZeRO stages 0, 1, 2 and the BF16 optimizer, assembled from layout + buffers + reducer + optimizer.

The engine talks to a sharding strategy through ``engine/strategy.py``'s ``ShardingStrategy``; this one builds
a ``FlatGroup`` per optimizer group (parameters in reverse registration order, which approximates the order
backward produces gradients, so buckets fill and launch early), wires the hooks, and answers memory questions.
"""

from __future__ import annotations

import torch
from torch import nn

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.zero.flat_buffer import FlatGroup
from shardwise.zero.flat_optimizer import FlatOptimizer
from shardwise.zero.fragments import Fragment, optimizer_state_slices
from shardwise.zero.hooks import register_grad_hooks
from shardwise.zero.layout import build_layout
from shardwise.zero.owners import register_owner
from shardwise.zero.policy import ZeroPolicy
from shardwise.zero.reducer import GradReducer
from shardwise.zero.strategy_base import StrategyBase, tensor_bytes


def _trainable_groups(module: nn.Module, basic: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
    """Each optimizer group's trainable parameters, ordered last-registered first (backward order)."""
    order = {id(p): i for i, p in enumerate(module.parameters())}
    out = []
    for group in basic.param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        missing = [p for p in params if id(p) not in order]
        if missing:
            raise ValueError(
                f"the optimizer holds {len(missing)} parameter(s) that are not parameters of the model "
                f"(first shape {tuple(missing[0].shape)}); build the optimizer from model.parameters()"
            )
        out.append(sorted(params, key=lambda p: -order[id(p)]))
    return out


class FlatStrategy(StrategyBase):
    """Data parallelism with optional optimizer-state (stage 1) and gradient (stage 2) partitioning."""

    def __init__(self, module: nn.Module, basic: torch.optim.Optimizer, policy: ZeroPolicy, group: Group) -> None:
        self.policy = policy
        self.group = group
        self.name = policy.name
        world = group.size if policy.partitioned else 1
        rank = group.rank if policy.partitioned else 0
        flat_groups: list[FlatGroup | None] = []
        for params in _trainable_groups(module, basic):
            if not params:
                flat_groups.append(None)
                continue
            layout = build_layout([p.numel() for p in params], policy.bucket_numel, world)
            flat_groups.append(FlatGroup(params, layout, rank))
        for g in flat_groups:
            if g is None:
                continue
            if policy.partitioned:
                g.allocate_part_grad(policy.grad_dtype)
            if not policy.reduce_every_micro_step:
                g.allocate_full_grad(policy.grad_dtype, as_param_grads=policy.grads_are_param_views)
            if policy.use_master:
                device = torch.device("cpu") if policy.offload_optimizer else g.device
                g.allocate_master(device, partitioned=policy.partitioned, pin=policy.pin_memory,
                                  dtype=policy.master_dtype, may_alias=not policy.offload_optimizer)
        self.optimizer = FlatOptimizer(basic, flat_groups, policy, group)
        self.reducer = GradReducer(self.optimizer.live_groups, policy, group)
        self._hooks = register_grad_hooks(self.reducer)
        self._managed: dict[int, tuple[FlatGroup, int]] | None = None
        register_owner((p for g in self.optimizer.live_groups for p in g.params), self)

    # -- the strategy protocol ------------------------------------------------------------------------------------
    def begin_backward(self, boundary: bool) -> None:
        """Arm gradient capture for one backward pass."""
        self.reducer.begin_backward(boundary)

    def end_backward(self) -> None:
        """Launch any reduction that backward did not trigger."""
        self.reducer.end_backward()

    def finish_gradients(self) -> None:
        """Wait until reduced gradients are in place."""
        self.reducer.wait_all()

    def publish_weights(self) -> None:
        """Make the model's weights current from the fp32 masters (after they were written, e.g. by a load)."""
        if self.policy.use_master:
            self.optimizer.publish()

    def zero_grad(self) -> None:
        """Reset gradient accumulation."""
        self.optimizer.zero_grad()
        self.reducer.reset_window()

    def unused_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that received no gradient since the last optimizer step."""
        return [self.reducer.groups[gi].params[pi] for gi, pi in self.reducer.untouched()]

    # -- state access ------------------------------------------------------------------------------------------
    def managed(self) -> dict[int, tuple[FlatGroup, int]]:
        """id(param) -> (its FlatGroup, its index in the group)."""
        if self._managed is None:
            self._managed = {id(p): (g, i) for g in self.optimizer.live_groups for i, p in enumerate(g.params)}
        return self._managed

    def accumulated_grad(self, param: nn.Parameter) -> torch.Tensor:
        """``param``'s local, not yet reduced gradient (a view of the full buffer; stages 0 and 1 only)."""
        found = self.managed().get(id(param))
        if found is None:
            raise KeyError(f"parameter of shape {tuple(param.shape)} is not managed by this strategy")
        g, i = found
        if g.full_grad is None:
            raise RuntimeError(f"{self.name} keeps no full gradient buffer (ZeRO stage 2 partitions gradients during "
                               "backward); local gradients exist only with stages 0 and 1")
        return g.param_view(g.full_grad, i)

    def fragments(self, param: nn.Parameter) -> list[Fragment]:
        """This rank's pieces of ``param``'s master values, gradient and optimizer state (empty if unmanaged)."""
        found = self.managed().get(id(param))
        if found is None:
            return []
        g, i = found
        slot = g.layout.slots[i]
        model_flat = param.data.view(-1)
        if not self.policy.use_master:  # stage 0 fp32: the optimizer steps the parameter itself
            grad = g.full_grad[slot.offset : slot.offset + slot.numel]
            state = optimizer_state_slices(self.optimizer.basic.state.get(param, {}), 0, slot.numel, slot.numel)
            return [Fragment(0, slot.numel, model_flat, model_flat, grad, state)]
        opt_state = self.optimizer.basic.state.get(g.master, {})
        if not self.policy.partitioned:
            off = slot.offset
            grad = g.full_grad[off : off + slot.numel]
            state = optimizer_state_slices(opt_state, off, slot.numel, g.master.numel())
            return [Fragment(0, slot.numel, g.master[off : off + slot.numel], model_flat, grad, state)]
        out = []
        for start, end, part in g.layout.owned_pieces(i, g.rank):
            n = end - start
            state = optimizer_state_slices(opt_state, part, n, g.master.numel())
            out.append(Fragment(start, end, g.master[part : part + n], model_flat[start:end],
                                g.part_grad[part : part + n], state))
        return out

    # -- memory -------------------------------------------------------------------------------------------------------
    def _held_bytes(self) -> tuple[int, int, int]:
        groups = self.optimizer.live_groups
        return (sum(tensor_bytes(g.flat) for g in groups),
                sum(tensor_bytes(g.full_grad) + tensor_bytes(g.part_grad) for g in groups),
                sum(tensor_bytes(g.master) for g in groups if not g.master_is_flat))

    @torch.no_grad()
    def sync_initial_weights(self, src: int) -> set[int]:
        """Broadcast each flat buffer from global rank ``src``, then retake the master copies (they were taken
        from this rank's weights before the broadcast)."""
        done: set[int] = set()
        for g in self.optimizer.live_groups:
            comm.broadcast(g.flat, src=src, group=self.group)
            done.update(id(p) for p in g.params)
        for g in self.optimizer.live_groups:
            if g.master is not None and not g.master_is_flat:
                source = g.param_shard_of_flat() if self.policy.partitioned else g.flat
                g.master.copy_(source.to(g.master.device, torch.float32))
        return done

    def describe(self) -> str:
        """One line for the log."""
        n = sum(g.numel() for g in self.optimizer.live_groups)
        buckets = sum(len(g.layout.buckets) for g in self.optimizer.live_groups)
        return (f"{self.name}: {n:,} trainable elements in {buckets} bucket(s) of <= {self.policy.bucket_numel:,}; "
                f"group {self.group!r}; grads accumulate in {str(self.policy.grad_dtype).replace('torch.', '')}"
                f"{'; optimizer on host' if self.policy.offload_optimizer else ''}")
