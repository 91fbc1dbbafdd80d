"""``deepspeed.runtime.zero.partition_parameters``: ``Init`` and ``GatheredParameters`` live in ``shardwise.zero``."""

from shardwise.zero import GatheredParameters, Init, register_external_parameter  # noqa: F401
