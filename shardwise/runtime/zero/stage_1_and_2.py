"""``deepspeed.runtime.zero.stage_1_and_2``: the memory estimators (``shardwise.zero.estimate``)."""

from shardwise.zero.estimate import (  # noqa: F401
    estimate_zero2_model_states_mem_needs_all_cold,
    estimate_zero2_model_states_mem_needs_all_live,
)
