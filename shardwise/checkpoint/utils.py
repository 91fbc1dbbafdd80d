"""``deepspeed.checkpoint.utils``: ``clone_tensors_for_torch_save``, for users who save state dicts themselves."""

from __future__ import annotations

from typing import Any

import torch


def clone_tensors_for_torch_save(item: Any, device: torch.device = torch.device("cpu")) -> Any:  # noqa: B008
    """A copy of ``item`` (tensors, or dicts/lists/tuples of them) whose tensors are compact clones on ``device``.

    Parameters of a flattened engine are views into one large buffer; ``torch.save`` of a view writes the whole
    buffer. Cloning first writes only each tensor's own elements.
    """
    if torch.is_tensor(item):
        return item.detach().to(device, copy=True)
    if isinstance(item, dict):
        return type(item)((k, clone_tensors_for_torch_save(v, device)) for k, v in item.items())
    if isinstance(item, (list, tuple)):
        return type(item)(clone_tensors_for_torch_save(v, device) for v in item)
    return item
