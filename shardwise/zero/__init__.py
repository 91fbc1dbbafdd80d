"""ZeRO: stages 0-2 (``flat_strategy``), stage 3 (``stage3``), and the user-facing helpers DeepSpeed exposes as
``deepspeed.zero``: ``Init``, ``GatheredParameters``, ``register_external_parameter``."""

from shardwise.zero.init_context import (
    GatheredParameters,
    Init,
    is_zero3_param,
    register_external_parameter,
    unregister_external_parameter,
)

__all__ = ["GatheredParameters", "Init", "is_zero3_param", "register_external_parameter",
           "unregister_external_parameter"]
