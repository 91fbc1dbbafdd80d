"""``Fragment``: this rank's piece of one parameter's training state, the common currency of checkpoints and of
the ZeRO inspection API (``safe_get_full_fp32_param`` and friends).

Every sharding strategy answers ``fragments(param)`` with the contiguous ranges of the *flattened full parameter*
that this rank holds, each with views of the fp32 master values, the model-dtype values, the reduced gradient and
the optimizer state for that range. A parameter's full tensor is the union of the fragments of the ranks in
``strategy.state_group`` (all ranks of the group together hold every element exactly once). Writers and readers
never need to know how a stage lays out its buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Fragment:
    """Elements ``[start, end)`` of a flattened parameter, as held by this rank."""

    start: int
    end: int
    fp32: torch.Tensor | None  # 1-D view of the fp32 master values (the parameter itself when it is fp32 and unsharded)
    model: torch.Tensor | None  # 1-D view of the model-dtype values (None when not resident, e.g. ZeRO-3 sharded)
    grad: torch.Tensor | None  # 1-D view of the reduced, summed gradient as stored (None before backward)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # 1-D views of per-element optimizer state

    @property
    def numel(self) -> int:
        """Number of elements in the fragment."""
        return self.end - self.start


def optimizer_state_slices(opt_state: dict, offset: int, length: int, numel_total: int) -> dict[str, torch.Tensor]:
    """Per-element optimizer state tensors (same size as the stepped tensor) sliced to ``[offset, offset+length)``."""
    out = {}
    for key, value in opt_state.items():
        if torch.is_tensor(value) and value.numel() == numel_total and value.dim() >= 1:
            out[key] = value.view(-1)[offset : offset + length]
    return out
