"""ZeRO-3: keep autograd from holding gathered parameters between forward and backward.

Releasing a unit after its module's forward points its parameters at empty tensors, but autograd may still hold
the full buffer: ``F.linear`` saves ``weight.t()`` (a *view* of the gathered buffer, not the parameter), and a
saved view keeps its whole storage alive until backward. Every layer's full weights would then stay resident
from forward to backward, i.e. the whole model, which is what ZeRO-3 exists to avoid (DeepSpeed swaps in its own
linear function for the same reason).

While the engine runs a forward, ``saved_tensors_hooks`` here pack any saved tensor that lives in a
non-persistent unit's gathered buffer as (unit, shape, stride, offset) instead of the tensor; unpacking in backward
rebuilds the view from the unit's buffer of that moment (the module's pre-backward hook has gathered it again; if
not, it is fetched on the spot). Other saved tensors (activations) pass through untouched; the cost is one dict
lookup per saved view.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from shardwise.zero.unit import ParamUnit, UnitState

if TYPE_CHECKING:
    from shardwise.zero.stage3 import Stage3Strategy


class _SavedParamView:
    """A saved tensor that was a view of a unit's gathered buffer."""

    __slots__ = ("unit", "size", "stride", "offset", "dtype")

    def __init__(self, unit: ParamUnit, t: torch.Tensor, base_offset: int) -> None:
        self.unit = unit
        self.size, self.stride = t.size(), t.stride()
        self.offset = t.storage_offset() - base_offset
        self.dtype = t.dtype


@contextlib.contextmanager
def saved_param_hooks(strategy: Stage3Strategy) -> Iterator[None]:
    """Within the block, saved views of gathered (non-persistent) parameters are re-derived in backward."""
    units = strategy.param_unit

    def pack(t: torch.Tensor) -> Any:
        base = t._base  # a view of a parameter has the parameter as its base (the parameter itself is a leaf,
        if base is None:  # saved as itself: autograd then sees whatever ``.data`` it points at later)
            return t
        unit = units.get(id(base))
        if unit is None or unit.persistent or unit.full is None:
            return t
        full = unit.full
        if t.untyped_storage().data_ptr() != full.untyped_storage().data_ptr():
            return t
        return _SavedParamView(unit, t, full.storage_offset())

    def unpack(saved: Any) -> torch.Tensor:
        if not isinstance(saved, _SavedParamView):
            return saved
        unit = saved.unit
        if unit.state is not UnitState.GATHERED:
            strategy.fetch([unit])
        full = unit.full
        return full.as_strided(saved.size, saved.stride, full.storage_offset() + saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
