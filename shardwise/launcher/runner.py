"""``deepspeed.launcher.runner``: the names ``accelerate launch`` imports before the user's script runs."""

from shardwise.launcher.cli import main

DEEPSPEED_ENVIRONMENT_NAME = ".deepspeed_env"  # the env file every rank's variables are read from (envfile.py)
DEEPSPEED_ENVIRONMENT_PATHS = ["~", "."]

__all__ = ["DEEPSPEED_ENVIRONMENT_NAME", "DEEPSPEED_ENVIRONMENT_PATHS", "main"]
