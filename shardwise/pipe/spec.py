"""``LayerSpec`` and ``TiedLayerSpec``: layers described, not built, so each stage builds only the layers it owns.

``LayerSpec(nn.Linear, 512, 512, bias=False)`` records the class and arguments; ``PipelineModule`` calls
``build()`` only on the stage that owns the layer, so a stage's memory holds its own layers only. A
``TiedLayerSpec`` names a module shared by several positions in the layer list (an input embedding reused as the
output projection): every stage that has one of those positions builds the module once, and the listed weight
attributes are kept identical across those stages (same initial values, gradients summed before each step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["LayerSpec", "TiedLayerSpec"]


def _call_repr(name: str, args: tuple, kwargs: dict) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


class LayerSpec:
    """A deferred ``typename(*module_args, **module_kwargs)`` (``deepspeed.pipe.LayerSpec``)."""

    def __init__(self, typename: type, *module_args: Any, **module_kwargs: Any) -> None:
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise TypeError(
                f"LayerSpec needs an nn.Module subclass, got {typename!r}; wrap plain functions directly in the "
                "layer list (PipelineModule accepts callables) instead"
            )
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self, log: bool = False) -> nn.Module:
        """Construct the layer."""
        if log:
            from shardwise.common.logging import logger

            logger.info("building %r", self)
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        return _call_repr(self.typename.__name__, self.module_args, self.module_kwargs)


class TiedLayerSpec(LayerSpec):
    """A layer whose weights are shared by every position in the layer list with the same ``key``.

    ``forward_fn(module, inputs)``, when given, replaces ``module(inputs)`` at this position (e.g. the output
    projection ``lambda emb, x: x @ emb.weight.t()`` reusing an embedding). ``tied_weight_attr`` names the
    attributes (dotted paths allowed) that are tied across stages; it defaults to ``["weight"]``.
    """

    def __init__(self, key: str, typename: type, *module_args: Any, forward_fn: Callable | None = None,
                 tied_weight_attr: str | list[str] | None = None, **module_kwargs: Any) -> None:
        super().__init__(typename, *module_args, **module_kwargs)
        self.key = key
        self.forward_fn = forward_fn
        attrs = ["weight"] if tied_weight_attr is None else tied_weight_attr
        self.tied_weight_attr = [attrs] if isinstance(attrs, str) else list(attrs)

    def __repr__(self) -> str:
        return f"Tied[{self.key}]" + super().__repr__()
