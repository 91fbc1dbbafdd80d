"""The only place ZeRO registers module and autograd hooks.

Stages 0-2: one post-accumulate-grad hook per trainable parameter hands the finished gradient to the
``GradReducer``. Stage 3: a forward pre-hook fetches a module's units, a forward hook releases them and routes the
outputs through ``_PreBackward`` (whose backward fetches them again, before the module's own backward), and
post-accumulate-grad hooks reduce-scatter a unit once all its gradients are ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree

from shardwise.zero.errors import BackwardOutsideEngineError, outside_engine_error  # noqa: F401 - re-exported
from shardwise.zero.reducer import GradReducer
from shardwise.zero.sharded_param import ZeroParameter  # noqa: F401 - defined there (with its state), once here

if TYPE_CHECKING:
    from shardwise.zero.stage3 import Stage3Strategy


def register_grad_hooks(reducer: GradReducer) -> list[Any]:
    """Attach the reducer to every parameter it manages; returns the handles (``remove()`` to detach)."""
    handles = []
    for gi, group in enumerate(reducer.groups):
        for pi, param in enumerate(group.params):
            handles.append(param.register_post_accumulate_grad_hook(_make_hook(reducer, gi, pi)))
    return handles


def _make_hook(reducer: GradReducer, gi: int, pi: int):
    def hook(_param: Any) -> None:
        reducer.on_grad_ready(gi, pi)

    return hook


# -- ZeRO-3 ----------------------------------------------------------------------------------------------------------
class _PreBackward(torch.autograd.Function):
    """Identity on a module's outputs whose backward gathers the module's units before its backward runs."""

    @staticmethod
    def forward(ctx: Any, strategy: Stage3Strategy, units: list, *tensors: torch.Tensor) -> Any:
        ctx.strategy, ctx.units = strategy, units
        # detach(): new tensor objects that callers may modify in place (a returned input could not be)
        out = tuple(t.detach() for t in tensors)
        return out if len(out) > 1 else out[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.strategy.pre_backward(ctx.units)
        return (None, None, *grads)


def wrap_for_backward(strategy: Stage3Strategy, units: list, output: Any) -> Any:
    """Route the floating-point outputs that require grad through ``_PreBackward`` (nested structures kept)."""
    leaves, spec = pytree.tree_flatten(output)
    positions = [i for i, x in enumerate(leaves) if torch.is_tensor(x) and x.requires_grad and x.is_floating_point()]
    if not positions:
        return output
    wrapped = _PreBackward.apply(strategy, units, *(leaves[i] for i in positions))
    if len(positions) == 1:
        wrapped = (wrapped,)
    for i, t in zip(positions, wrapped):
        leaves[i] = t
    return pytree.tree_unflatten(leaves, spec)


def register_stage3_hooks(strategy: Stage3Strategy) -> list[Any]:
    """Module pre/post-forward hooks on every module that uses sharded parameters, and gradient-ready hooks."""
    handles = []
    for module in list(strategy.module_units):
        handles.extend(add_module_hooks(strategy, module))
    for unit in strategy.units:
        if not unit.trainable:
            continue
        for index, param in enumerate(unit.params):
            handles.append(param.register_post_accumulate_grad_hook(_grad_ready_hook(strategy, unit, index)))
    return handles


def add_module_hooks(strategy: Stage3Strategy, module: torch.nn.Module) -> list[Any]:
    """Fetch a module's units before its forward; release them and arm the pre-backward fetch after it."""

    def pre_forward(mod: torch.nn.Module, args: Any) -> None:
        strategy.fetch(strategy.module_units[mod])
        strategy.active_modules.append(mod)

    def post_forward(mod: torch.nn.Module, args: Any, output: Any) -> Any:
        if strategy.active_modules and strategy.active_modules[-1] is mod:
            strategy.active_modules.pop()
        units = strategy.module_units[mod]
        strategy.release(units)
        if torch.is_grad_enabled():
            return wrap_for_backward(strategy, units, output)
        return output

    return [module.register_forward_pre_hook(pre_forward), module.register_forward_hook(post_forward)]


def _grad_ready_hook(strategy: Stage3Strategy, unit: Any, index: int):
    def hook(_param: Any) -> None:
        strategy.on_grad_ready(unit, index)

    return hook
