"""``shardwise-check-config FILE [--world-size N]``: validate a ds_config and print every resolved value.

stdout gets one JSON document: ``{"file", "dp_world_size", "auto_keys", "warnings", "config"}`` where
``config`` is the fully resolved config (defaults and "auto" filled in, batch triad computed). stderr gets a
one-line verdict. Exit status: 0 valid, 1 invalid config (the error explains the key and the fix), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .errors import ConfigError
from .loader import load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardwise-check-config",
        description="Validate a DeepSpeed/shardwise config file and print the resolved values as JSON.")
    parser.add_argument("file", help="path of the ds_config JSON file (or a urlsafe-base64 JSON string)")
    parser.add_argument("--world-size", "--dp", dest="world_size", type=int, default=1, metavar="N",
                        help="data-parallel size to resolve the batch keys for (default: 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``shardwise-check-config``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error (or --help)
        return int(exc.code or 0)
    if args.world_size < 1:
        print(f"error: --world-size must be a positive integer, got {args.world_size}", file=sys.stderr)
        return 2
    quiet = logging.NullHandler()  # warnings go into the JSON; keep Python's last-resort handler quiet
    logger = logging.getLogger("shardwise.config")
    logger.addHandler(quiet)
    try:
        cfg = load_config(args.file, dp_world_size=args.world_size, log=False)
    except ConfigError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(quiet)
    report = {"file": args.file, "dp_world_size": cfg.dp_world_size, "auto_keys": list(cfg.auto_keys),
              "warnings": list(cfg.warnings), "config": cfg.to_dict()}
    try:
        print(json.dumps(report, indent=2), flush=True)
    except BrokenPipeError:  # piped into `head`: not an error of the config
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print(f"OK: {args.file} is valid for data-parallel size {cfg.dp_world_size}: train_batch_size "
          f"{cfg.train_batch_size} = micro {cfg.train_micro_batch_size_per_gpu} x accumulation "
          f"{cfg.gradient_accumulation_steps} x dp {cfg.dp_world_size} ({len(cfg.auto_keys)} auto key(s), "
          f"{len(cfg.warnings)} warning(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
