"""``deepspeed.runtime.activation_checkpointing``: see ``shardwise.activation_checkpointing``."""

from shardwise.runtime.activation_checkpointing import checkpointing  # noqa: F401 - DeepSpeed's attribute path
