"""Errors raised by ZeRO's gradient hooks (both the flat reducer and ZeRO-3), in one leaf module both import."""

from __future__ import annotations

from typing import Any


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
