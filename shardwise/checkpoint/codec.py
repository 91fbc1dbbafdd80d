"""JSON with tensors, without pickle: how ``client_state``, scheduler state and optimizer hyperparameters are stored.

``encode`` turns a value made of dicts, lists, tuples, str, int, float, bool, None and torch tensors into plain JSON;
tensors are moved out to the caller (they go into the rank's safetensors file) and replaced by
``{"__tensor__": key}``. Tuples and dicts with non-string keys are tagged so they come back as they went in; numpy
scalars become Python numbers. Anything else (arbitrary objects, functions, numpy arrays) is refused with the path
to the offending value: a checkpoint must never need unpickling to be read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from shardwise.checkpoint.errors import CheckpointError

TENSOR, TUPLE, ITEMS, FLOAT = "__tensor__", "__tuple__", "__items__", "__float__"
_TAGS = (TENSOR, TUPLE, ITEMS, FLOAT)


def encode(value: Any, tensors: dict[str, torch.Tensor], prefix: str, where: str = "client_state") -> Any:
    """``value`` as JSON; tensors are added to ``tensors`` under keys ``<prefix><n>``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {FLOAT: repr(value)}
    if isinstance(value, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = value.detach()
        return {TENSOR: key}
    if isinstance(value, tuple):
        return {TUPLE: [encode(v, tensors, prefix, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, prefix, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            bad = [k for k in value if k in _TAGS]
            if bad:
                raise CheckpointError(f"{where} uses the reserved key {bad[0]!r}; rename it")
            return {k: encode(v, tensors, prefix, f"{where}[{k!r}]") for k, v in value.items()}
        return {ITEMS: [[encode(k, tensors, prefix, f"{where} key"), encode(v, tensors, prefix, f"{where}[{k!r}]")]
                        for k, v in value.items()]}
    import numpy as np

    if isinstance(value, np.generic):
        return encode(value.item(), tensors, prefix, where)
    if isinstance(value, np.ndarray):
        raise CheckpointError(f"{where} is a numpy array; store torch.from_numpy(array) (it comes back as a tensor) "
                              "or array.tolist()")
    raise CheckpointError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints store JSON values (dict, "
        "list, tuple, str, int, float, bool, None) and tensors only, never pickled objects. Convert it (for example "
        "to a dict of numbers or a tensor) before saving"
    )


def decode(value: Any, fetch: Callable[[str], torch.Tensor]) -> Any:
    """Inverse of :func:`encode`; ``fetch(key)`` returns a stored tensor."""
    if isinstance(value, list):
        return [decode(v, fetch) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == TENSOR:
            return fetch(inner)
        if tag == TUPLE:
            return tuple(decode(v, fetch) for v in inner)
        if tag == ITEMS:
            return {_hashable(decode(k, fetch)): decode(v, fetch) for k, v in inner}
        if tag == FLOAT:
            return float(inner)
    return {k: decode(v, fetch) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key
