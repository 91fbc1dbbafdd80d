"""``deepspeed.checkpointing``: activation checkpointing under DeepSpeed's name.

The implementation is ``shardwise.activation_checkpointing``.

Not to be confused with saving model checkpoints (``engine.save_checkpoint``, ``shardwise.checkpoint``).
"""

from shardwise.activation_checkpointing import *  # noqa: F403 - this module is a name-for-name alias
from shardwise.activation_checkpointing import __all__  # noqa: F401
