"""Automatic detection of ZeRO-3 parameters used outside the module that owns them.

A module's hooks gather the parameters it owns. A forward that reaches into another module's weights (a parent
using ``self.lm_head.weight`` directly, a tied weight read by a functional call) would see an empty tensor. While
the engine runs a forward, this ``TorchFunctionMode`` looks at the arguments of every torch call: a released
ZeRO-3 parameter among them is gathered on the spot, registered as external to the module being run (so the next
steps fetch and prefetch it with that module), and the call's outputs are routed through the pre-backward fetch
so backward finds it gathered again. The cost is one isinstance scan of each call's arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

from shardwise.zero.unit import UnitState

if TYPE_CHECKING:
    from shardwise.zero.stage3 import Stage3Strategy


def _released_units(strategy: Stage3Strategy, values: Any, found: list) -> None:
    for v in values:
        # a plain Tensor check and a lookup by id: ``isinstance(v, nn.Parameter)`` goes through Parameter's
        # Python-level ``__instancecheck__``, which dominated this scan (the model's parameters are alive, so no
        # other tensor can carry one of their ids)
        if isinstance(v, torch.Tensor):
            unit = strategy.param_unit.get(id(v))
            if unit is not None and unit.state is not UnitState.GATHERED and unit not in found:
                found.append(unit)
        elif isinstance(v, (list, tuple)):
            _released_units(strategy, v, found)


class ExternalParameterMode(TorchFunctionMode):
    """Gather-on-use for parameters outside the running module's own."""

    def __init__(self, strategy: Stage3Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.strategy.internal:  # the strategy's own gathers and rebinding of .data
            return func(*args, **kwargs)
        units: list = []
        _released_units(self.strategy, args, units)
        if kwargs:
            _released_units(self.strategy, kwargs.values(), units)
        if not units:
            return func(*args, **kwargs)
        self.strategy.fetch(units)
        if self.strategy.active_modules:
            self.strategy.register_external_units(self.strategy.active_modules[-1], units)
        out = func(*args, **kwargs)
        if torch.is_grad_enabled():
            from shardwise.zero.hooks import wrap_for_backward

            out = wrap_for_backward(self.strategy, units, out)
        return out
