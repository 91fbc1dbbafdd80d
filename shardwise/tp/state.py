"""Full <-> tensor-parallel state dicts for any module containing the layers of ``layers.py``.

``load_full_state_dict`` loads the state dict of the unsplit model (same keys) into a tensor-parallel one: each
split weight receives this rank's slice, everything else is copied. ``full_state_dict`` is the inverse (a
collective over the tensor group: every rank must call it). Together they make a tensor-parallel model exactly
comparable with its degree-1 reference, and let checkpoints be written in the full layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from shardwise.tp.layers import PARALLEL_LAYERS


def _owners(module: nn.Module) -> dict[str, Any]:
    return {name: m for name, m in module.named_modules() if isinstance(m, PARALLEL_LAYERS)}


def load_full_state_dict(module: nn.Module, full: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
    """Load the unsplit model's ``full`` state dict into ``module``, slicing split weights for this rank."""
    owners = _owners(module)
    local = {}
    for key, value in full.items():
        prefix, _, name = key.rpartition(".")
        owner = owners.get(prefix)
        local[key] = owner.shard_full(name, value) if owner is not None else value
    return module.load_state_dict(local, strict=strict)


@torch.no_grad()
def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsplit state dict of a tensor-parallel ``module`` (collective over each layer's tensor group)."""
    owners = _owners(module)
    out = {}
    for key, value in module.state_dict().items():
        prefix, _, name = key.rpartition(".")
        owner = owners.get(prefix)
        out[key] = owner.gather_full(name, value) if owner is not None else value.detach().clone()
    return out
