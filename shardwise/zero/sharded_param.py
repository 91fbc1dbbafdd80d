"""``ShardedParam``: ZeRO-3's state for one parameter, owned by one object (FSDP2's ``FSDPParam`` plays this role).

A ZeRO-3 parameter is gathered and released with its ``ParamUnit``; what the rest of shardwise needs to know about
it (its unit, its index there, the strategy that manages it, its full shape and status) is answered here. The
parameter carries one reference to its ``ShardedParam`` (``param._sw_sharded``) and is switched to
``ZeroParameter``, whose ``ds_*`` properties (DeepSpeed's parameter API) read that object. Everything else asks
``sharded(param)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shardwise.zero.param_status import ZeroParamStatus

if TYPE_CHECKING:
    from shardwise.zero.stage3 import Stage3Strategy
    from shardwise.zero.unit import ParamUnit

_STATUS = {"gathered": ZeroParamStatus.AVAILABLE, "gathering": ZeroParamStatus.INFLIGHT}


class ShardedParam:
    """One parameter of a ZeRO-3 unit."""

    __slots__ = ("index", "strategy", "unit")

    def __init__(self, unit: ParamUnit, index: int, strategy: Stage3Strategy) -> None:
        self.unit = unit
        """The unit that gathers, releases and reduces this parameter together with its siblings."""
        self.index = index
        """Position in ``unit.params`` (and ``unit.layout.slots``)."""
        self.strategy = strategy
        """The strategy managing the unit (kept alive by its parameters, as ``GatheredParameters`` needs it)."""

    @property
    def shape(self) -> torch.Size:
        """The full shape (``.shape`` is ``(0,)`` while the parameter is released)."""
        return self.unit.shapes[self.index]

    @property
    def status(self) -> ZeroParamStatus:
        """DeepSpeed's ``ds_status``: ``AVAILABLE``, ``INFLIGHT`` or ``NOT_AVAILABLE`` (equal to those strings)."""
        return _STATUS.get(self.unit.state.value, ZeroParamStatus.NOT_AVAILABLE)

    @property
    def ds_id(self) -> int:
        """A stable id: the unit id times 1000 plus the position inside the unit."""
        return self.unit.uid * 1000 + self.index


def sharded(param: torch.Tensor) -> ShardedParam | None:
    """The ZeRO-3 state of ``param``, or None when no ZeRO-3 strategy manages it."""
    return getattr(param, "_sw_sharded", None)


class ZeroParameter(torch.nn.Parameter):
    """The class a ZeRO-3 parameter is switched to: DeepSpeed's ``ds_*`` attributes as read-only properties."""

    @property
    def ds_shape(self) -> torch.Size:
        """The full shape (``.shape`` is ``(0,)`` while the parameter is released)."""
        return self._sw_sharded.shape

    @property
    def ds_numel(self) -> int:
        """Elements of the full parameter."""
        return self.ds_shape.numel()

    @property
    def ds_status(self) -> ZeroParamStatus:
        """``AVAILABLE`` when gathered, ``INFLIGHT`` while gathering, else ``NOT_AVAILABLE`` (equal to those
        strings too)."""
        return self._sw_sharded.status

    @property
    def ds_id(self) -> int:
        """A stable id: the unit id times 1000 plus the position inside the unit."""
        return self._sw_sharded.ds_id

    @property
    def ds_tensor(self) -> torch.Tensor:
        """This rank's piece of the parameter, in the model dtype (1-D; may be empty)."""
        state = self._sw_sharded
        frags = state.strategy.fragments(self)
        if not frags:
            return torch.empty(0, dtype=state.unit.dtype)
        return frags[0].model


def attach(param: torch.nn.Parameter, unit: ParamUnit, strategy: Stage3Strategy) -> ShardedParam:
    """Make ``param`` a ZeRO-3 parameter of ``unit``: its ``ShardedParam`` and the ``ds_*`` properties.

    The ``__class__`` switch is kept because DeepSpeed code reads ``param.ds_shape`` etc. on the parameter itself
    and a subclass adds them without copying the tensor; plain ``nn.Parameter`` and ``zero.Init``'s subclass only
    (other subclasses keep their class and are reached through ``sharded()``)."""
    state = ShardedParam(unit, next(i for i, p in enumerate(unit.params) if p is param), strategy)
    param._sw_sharded = state
    if type(param) is torch.nn.Parameter or isinstance(param, ZeroParameter):  # incl. zero.Init's subclass
        param.__class__ = ZeroParameter
    return state
