"""Which sharding strategy manages a parameter: the lookup behind the ZeRO inspection API.

``safe_get_full_fp32_param(param)`` and friends receive nothing but a parameter. Rather than gluing state onto
``nn.Parameter`` attributes, a strategy registers the parameters it manages here, and readers ask ``owner_of``.
Both sides are weak: a registered parameter does not keep its strategy (and its buffers) alive, and a dropped
model does not linger in the table. Building a new engine over the same parameters re-registers them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch.utils.weak import WeakIdKeyDictionary

from shardwise.zero.sharded_param import sharded

if TYPE_CHECKING:
    from shardwise.engine.strategy import ShardingStrategy


_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_owner(params: Iterable[Any], strategy: ShardingStrategy) -> None:
    """Record that ``strategy`` manages every parameter in ``params`` (its ``fragments(p)`` answers for them)."""
    ref = weakref.ref(strategy)
    for p in params:
        _OWNERS[p] = ref


def owner_of(param: Any) -> Any | None:
    """The live strategy managing ``param``, or None (not trainable, not wrapped, or its engine is gone)."""
    ref = _OWNERS.get(param)
    strategy = ref() if ref is not None else None
    if strategy is None:
        state = sharded(param)  # ZeRO-3 parameters hold their ShardedParam, which holds the strategy
        strategy = state.strategy if state is not None else None
    return strategy
