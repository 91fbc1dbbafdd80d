"""ZeRO stage 3: parameters partitioned, gathered around each module's forward and backward.

The package is split by responsibility:

- ``build.py``: units from the module tree, their groups' shard buffers (``Stage3Group``), persistence, prefetch
  limits, and the first cut of every parameter into this rank's shard;
- ``fetch.py``: the fetch/release state machine and the micro-step ``Phase``;
- ``reduce.py``: gradient reduction (reduce-scatter of a unit as soon as its gradients are ready);
- ``state.py``: state access (fragments, republishing shards, memory, the log line);
- ``strategy.py``: ``Stage3Strategy``, which assembles them on ``zero.strategy_base.StrategyBase``.

Per-parameter state lives in ``zero/sharded_param.py``; the module and autograd hooks in ``zero/hooks.py``; the
collectives in ``zero/shard_comm.py``; a unit's mechanics in ``zero/unit.py``.
"""

from shardwise.zero.stage3.build import Stage3Group, auto_granularity
from shardwise.zero.stage3.fetch import Phase
from shardwise.zero.stage3.strategy import Stage3Strategy

__all__ = ["Phase", "Stage3Group", "Stage3Strategy", "auto_granularity"]
