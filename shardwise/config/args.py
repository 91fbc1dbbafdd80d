"""add_config_arguments(): the DeepSpeed command-line flags for passing a config, on the user's parser.

Same flags as ``deepspeed.add_config_arguments``: ``--deepspeed`` (enable), ``--deepspeed_config PATH`` and the
deprecated ``--deepscale`` / ``--deepscale_config``; plus ``--shardwise_config`` as another spelling of
``--deepspeed_config``. ``load_config(args)`` reads the resulting Namespace.
"""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the DeepSpeed/shardwise config flags to ``parser`` and return it (as DeepSpeed does)."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Enable DeepSpeed (helper flag for user code, no impact on the engine)")
    group.add_argument("--deepspeed_config", "--shardwise_config", dest="deepspeed_config", default=None,
                       type=str, help="DeepSpeed json configuration file.")
    group.add_argument("--deepscale", default=False, action="store_true",
                       help="Deprecated enable DeepSpeed (helper flag for user code, no impact on the engine)")
    group.add_argument("--deepscale_config", default=None, type=str,
                       help="Deprecated DeepSpeed json configuration file.")
    return parser
