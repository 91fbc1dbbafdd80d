"""``deepspeed.runtime.zero.partition_parameters``: ``Init``, ``GatheredParameters`` and ``ZeroParamStatus`` live
in ``shardwise.zero``; the tensor-constructor wrapper is here for integrations that patch it.

shardwise's ``Init`` does not patch torch's tensor constructors: it casts and partitions each module's parameters
when the module finishes constructing (``zero/init_context.py``). transformers nevertheless swaps
``zero_wrapper_for_fp_tensor_constructor`` around ``from_pretrained`` (to keep ``torch.arange`` dtypes), so the
function and ``_orig_torch_arange`` exist with DeepSpeed's meaning: wrap a constructor so that floating-point
results get ``target_fp_dtype`` and the target device."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from shardwise.zero import GatheredParameters, Init, register_external_parameter  # noqa: F401
from shardwise.zero.init_context import InitParameter, is_zero3_param
from shardwise.zero.param_status import ZeroParamStatus

_orig_torch_empty = torch.empty
_orig_torch_zeros = torch.zeros
_orig_torch_ones = torch.ones
_orig_torch_full = torch.full
_orig_torch_arange = torch.arange


def zero_wrapper_for_fp_tensor_constructor(fn: Callable, target_fp_dtype: torch.dtype,
                                           target_device: Any = None) -> Callable:
    """``fn`` (a tensor constructor) returning its floating-point results in ``target_fp_dtype`` on
    ``target_device`` (when given and the caller passed no device)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("device") is None and target_device is not None:
            kwargs["device"] = target_device
        tensor = fn(*args, **kwargs)
        return tensor.to(target_fp_dtype) if tensor.is_floating_point() else tensor

    return wrapped


__all__ = ["GatheredParameters", "Init", "InitParameter", "ZeroParamStatus", "is_zero3_param",
           "register_external_parameter", "zero_wrapper_for_fp_tensor_constructor"]
