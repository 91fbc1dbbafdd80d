"""``deepspeed.runtime.zero``: the ZeRO helpers DeepSpeed users import from here (aliases of ``shardwise.zero``)."""

from shardwise.zero import GatheredParameters, Init, register_external_parameter, unregister_external_parameter

__all__ = ["GatheredParameters", "Init", "register_external_parameter", "unregister_external_parameter"]
