"""``deepspeed.runtime.zero.stage3``: the memory estimators (``shardwise.zero.estimate``)."""

from shardwise.zero.estimate import (  # noqa: F401
    estimate_zero3_model_states_mem_needs_all_cold,
    estimate_zero3_model_states_mem_needs_all_live,
)
