"""``deepspeed.runtime.activation_checkpointing.checkpointing``: alias of ``shardwise.activation_checkpointing``."""

from shardwise.activation_checkpointing import *  # noqa: F403 - this module is a name-for-name alias
from shardwise.activation_checkpointing import __all__  # noqa: F401
