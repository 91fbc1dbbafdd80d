"""``deepspeed.runtime.utils``: the helpers user code and integrations import from there."""

from __future__ import annotations

from typing import Any

import torch

from shardwise.utils.memory import see_memory_usage


def move_to_device(item: Any, device: torch.device | str, criterion_func: Any = None) -> Any:
    """Move the tensors inside ``item`` (nested lists / tuples / dicts) to ``device``; other values are kept.
    ``criterion_func(tensor)``, when given, picks which tensors move."""
    if torch.is_tensor(item):
        return item.to(device) if criterion_func is None or criterion_func(item) else item
    if isinstance(item, dict):
        return {k: move_to_device(v, device, criterion_func) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        moved = [move_to_device(v, device, criterion_func) for v in item]
        return type(item)(*moved) if hasattr(item, "_fields") else type(item)(moved)
    return item


__all__ = ["move_to_device", "see_memory_usage"]
