"""``deepspeed.utils.set_z3_leaf_modules`` and friends: mark modules that ZeRO-3 must treat as one block.

DeepSpeed gathers a leaf module's whole subtree at its forward instead of hooking each child (mixture-of-experts
blocks whose routing skips some experts). The mark is the ``_z3_leaf`` attribute, as in DeepSpeed; these helpers
set, clear and read it. shardwise's ZeRO-3 does not read the mark yet: :func:`set_z3_leaf_modules` says so in a
warning rather than pretending to honour it."""

from __future__ import annotations

from torch import nn

from shardwise.common.logging import logger


def _matches(module: nn.Module, classes: list[type | str]) -> bool:
    for cls in classes:
        if isinstance(cls, str) and type(module).__name__ == cls:
            return True
        if isinstance(cls, type) and isinstance(module, cls):
            return True
    return False


def set_z3_leaf_modules(model: nn.Module, leaf_module_classes: list[type | str]) -> list[nn.Module]:
    """Mark every submodule of ``model`` that is an instance of one of ``leaf_module_classes`` (classes or class
    names) as a ZeRO-3 leaf; returns the marked modules. Raises ``ValueError`` when none matches."""
    marked = [m for m in model.modules() if _matches(m, list(leaf_module_classes))]
    if not marked:
        names = [c if isinstance(c, str) else c.__name__ for c in leaf_module_classes]
        raise ValueError(f"set_z3_leaf_modules: no submodule of {type(model).__name__} is one of {names}")
    for m in marked:
        m._z3_leaf = True
    logger.warning("set_z3_leaf_modules: marked %d module(s) as ZeRO-3 leaves, but shardwise's ZeRO-3 does not honour "
                   "leaf marks yet (each submodule is still gathered by its own hooks)", len(marked))
    return marked


def unset_z3_leaf_modules(model: nn.Module, leaf_module_classes: list[type | str]) -> list[nn.Module]:
    """Clear the mark set by :func:`set_z3_leaf_modules`; returns the modules cleared."""
    cleared = [m for m in model.modules() if _matches(m, list(leaf_module_classes))]
    for m in cleared:
        m._z3_leaf = False
    return cleared


def z3_leaf_module(module: nn.Module) -> bool:
    """Whether ``module`` is marked as a ZeRO-3 leaf."""
    return bool(getattr(module, "_z3_leaf", False))


def get_z3_leaf_modules(model: nn.Module) -> list[nn.Module]:
    """The submodules of ``model`` marked as ZeRO-3 leaves."""
    return [m for m in model.modules() if z3_leaf_module(m)]


__all__ = ["get_z3_leaf_modules", "set_z3_leaf_modules", "unset_z3_leaf_modules", "z3_leaf_module"]
