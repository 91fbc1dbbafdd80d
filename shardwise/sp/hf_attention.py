"""How transformers names and finds attention functions: the implementations Ulysses wraps, and a model's own
eager attention (shared by the wrapper, ``hf_ulysses``, and its installer, ``hf_registry``)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

#: attention implementations whose masks this module rebuilds for the full sequence
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


def model_eager_function(module: nn.Module) -> Callable:
    """The ``eager_attention_forward`` of the modeling file that defines ``module`` (each architecture has its own)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise TypeError(f"Ulysses with attn_implementation='eager': {type(module).__module__} defines no "
                        "eager_attention_forward to call; use attn_implementation='sdpa'")
    return fn
