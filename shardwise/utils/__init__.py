"""Utilities users import from ``deepspeed.utils``: logging, ZeRO inspection helpers, RepeatingLoader."""

from shardwise.common.logging import log_dist, logger
from shardwise.utils.repeating_loader import RepeatingLoader
from shardwise.utils.zero_inspect import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_grad,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_grad,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_grad,
    safe_set_local_optimizer_state,
    safe_update_full_grad_vectorized,
)


def __getattr__(name: str):
    # Lazy: zero_to_fp32 imports checkpoint/, which imports utils.progress; loading it eagerly here would make
    # ``import shardwise.common.progress`` from inside checkpoint/ a cycle.
    if name == "zero_to_fp32":
        import importlib

        return importlib.import_module("shardwise.utils.zero_to_fp32")
    if name in ("groups", "z3_leaf"):
        import importlib
        return importlib.import_module(f"shardwise.utils.{name}")
    if name in ("set_z3_leaf_modules", "unset_z3_leaf_modules", "z3_leaf_module", "get_z3_leaf_modules"):
        from shardwise.utils import z3_leaf
        return getattr(z3_leaf, name)
    if name == "OnDevice":  # deepspeed.utils.OnDevice; lives with the inference engine
        from shardwise.inference.on_device import OnDevice

        return OnDevice
    raise AttributeError(f"module 'shardwise.utils' has no attribute {name!r}")


__all__ = [
    "OnDevice",
    "RepeatingLoader",
    "get_z3_leaf_modules",
    "groups",
    "log_dist",
    "logger",
    "safe_get_full_fp32_param",
    "safe_get_full_grad",
    "safe_get_full_optimizer_state",
    "safe_get_local_fp32_param",
    "safe_get_local_grad",
    "safe_get_local_optimizer_state",
    "safe_set_full_fp32_param",
    "safe_set_full_grad",
    "safe_set_full_optimizer_state",
    "safe_set_local_fp32_param",
    "safe_set_local_grad",
    "safe_set_local_optimizer_state",
    "safe_update_full_grad_vectorized",
    "set_z3_leaf_modules",
    "unset_z3_leaf_modules",
    "z3_leaf_module",
    "zero_to_fp32",
]
