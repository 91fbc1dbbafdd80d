"""``deepspeed.runtime.pipe.schedule``: alias of ``shardwise.pipe.schedule`` (instructions and schedules)."""

from shardwise.pipe.schedule import *  # noqa: F403 - this module is a name-for-name alias
from shardwise.pipe.schedule import __all__  # noqa: F401
