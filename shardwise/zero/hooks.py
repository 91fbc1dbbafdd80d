"""The only place ZeRO registers module and autograd hooks.

Stages 0-2: one post-accumulate-grad hook per trainable parameter hands the finished gradient to the
``GradReducer``. Stage 3: a forward pre-hook fetches a module's units, a forward hook releases them and routes the
outputs through ``_PreBackward`` (whose backward fetches them again, before the module's own backward), and
post-accumulate-grad hooks reduce-scatter a unit once all its gradients are ready.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from shardwise.zero.param_status import ZeroParamStatus
from shardwise.zero.reducer import GradReducer


class BackwardOutsideEngineError(RuntimeError):
    """A gradient reached a ZeRO-managed parameter in a backward pass the engine did not arm: it would be
    accumulated but never reduced (ranks would silently diverge)."""


def outside_engine_error(shape: Any) -> BackwardOutsideEngineError:
    """The error for a gradient of a parameter of ``shape`` arriving outside any armed backward pass."""
    return BackwardOutsideEngineError(
        f"a gradient reached a parameter of shape {tuple(shape)} in a backward pass the engine did not see start: "
        "the loss was not computed from the engine's forward (engine(...)), e.g. engine.module(...) was called "
        "directly, or the forward returned its tensors inside an object torch.utils._pytree cannot look into. Fix: "
        "compute the loss from engine(...) outputs (then loss.backward() or engine.backward(loss) both work), "
        "return tensors, tuples, dicts or dataclasses registered with torch.utils._pytree, or call "
        "engine.backward(loss)")


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
    def forward(ctx: Any, strategy: Any, units: list, *tensors: torch.Tensor) -> Any:
        ctx.strategy, ctx.units = strategy, units
        # detach(): new tensor objects that callers may modify in place (a returned input could not be)
        out = tuple(t.detach() for t in tensors)
        return out if len(out) > 1 else out[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.strategy.pre_backward(ctx.units)
        return (None, None, *grads)


def wrap_for_backward(strategy: Any, units: list, output: Any) -> Any:
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


def register_stage3_hooks(strategy: Any) -> list[Any]:
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


def add_module_hooks(strategy: Any, module: torch.nn.Module) -> list[Any]:
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


def _grad_ready_hook(strategy: Any, unit: Any, index: int):
    def hook(_param: Any) -> None:
        strategy.on_grad_ready(unit, index)

    return hook


class ZeroParameter(torch.nn.Parameter):
    """The class a ZeRO-3 parameter is switched to: DeepSpeed's ``ds_*`` attributes as read-only properties."""

    @property
    def ds_shape(self) -> torch.Size:
        """The full shape (``.shape`` is ``(0,)`` while the parameter is released)."""
        unit = self._sw_unit
        return unit.shapes[self._sw_index]

    @property
    def ds_numel(self) -> int:
        """Elements of the full parameter."""
        return self.ds_shape.numel()

    @property
    def ds_status(self) -> ZeroParamStatus:
        """``AVAILABLE`` when gathered, ``INFLIGHT`` while gathering, else ``NOT_AVAILABLE`` (equal to those
        strings too)."""
        return {"gathered": ZeroParamStatus.AVAILABLE, "gathering": ZeroParamStatus.INFLIGHT}.get(
            self._sw_unit.state.value, ZeroParamStatus.NOT_AVAILABLE)

    @property
    def ds_id(self) -> int:
        """A stable id: the unit id times 1000 plus the position inside the unit."""
        unit = self._sw_unit
        return unit.uid * 1000 + self._sw_index

    @property
    def ds_tensor(self) -> torch.Tensor:
        """This rank's piece of the parameter, in the model dtype (1-D; may be empty)."""
        frags = self._sw_strategy.fragments(self)
        if not frags:
            return torch.empty(0, dtype=self._sw_unit.dtype)
        return frags[0].model


def mark_zero3_param(param: torch.nn.Parameter, unit: Any, strategy: Any) -> None:
    """Attach a parameter to its unit and give it the ``ds_*`` properties."""
    param._sw_unit = unit
    param._sw_index = next(i for i, p in enumerate(unit.params) if p is param)
    param._sw_strategy = strategy
    if type(param) is torch.nn.Parameter or isinstance(param, ZeroParameter):  # incl. zero.Init's subclass
        param.__class__ = ZeroParameter
