"""``deepspeed.checkpoint.ds_to_universal``: DeepSpeed's offline "universal checkpoint" conversion, for scripts that
still run it.

A shardwise checkpoint is universal already: any layout (world size, ZeRO stage, tp/pp) loads it as it is
(``docs/checkpoint.md``). So the conversion only copies the tag directory to ``--output_folder`` and writes
``latest_universal`` next to it (the tag file ``checkpoint.load_universal`` reads), after checking that the input is
a committed shardwise checkpoint. DeepSpeed's worker-count and strictness flags are accepted and have nothing to do.

    python -m shardwise.checkpoint.ds_to_universal --input_folder ckpt/global_step10 \\
        --output_folder ckpt/global_step10_universal
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

from shardwise.checkpoint.files import MANIFEST


def convert(input_folder: str, output_folder: str) -> str:
    """Copy the checkpoint tag directory ``input_folder`` to ``output_folder`` and point ``latest_universal`` (in
    ``output_folder``'s parent) at it; returns the tag written. Raises ``FileNotFoundError`` naming the folder when
    it holds no committed shardwise checkpoint and ``FileExistsError`` when the output exists."""
    if not os.path.isfile(os.path.join(input_folder, MANIFEST)):
        raise FileNotFoundError(f"--input_folder {input_folder!r} holds no {MANIFEST}: pass a checkpoint tag directory "
                                "(<save_dir>/<tag>) written by save_checkpoint")
    if os.path.exists(output_folder):
        raise FileExistsError(f"--output_folder {output_folder!r} already exists; remove it or choose another")
    shutil.copytree(input_folder, output_folder)
    parent, tag = os.path.split(os.path.abspath(output_folder))
    with open(os.path.join(parent, "latest_universal"), "w") as f:
        f.write(tag)
    return tag


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: DeepSpeed's flags; returns the exit code."""
    parser = argparse.ArgumentParser(prog="ds_to_universal", description=__doc__.splitlines()[0])
    parser.add_argument("--input_folder", required=True, help="checkpoint tag directory (<save_dir>/<tag>)")
    parser.add_argument("--output_folder", required=True, help="where the universal checkpoint goes")
    for flag in ("--num_extract_workers", "--num_merge_workers"):
        parser.add_argument(flag, type=int, default=1, help="accepted for DeepSpeed compatibility (nothing to do)")
    for flag in ("--keep_temp_folder", "--strict", "--no_strict", "--inject_missing_state"):
        parser.add_argument(flag, action="store_true", help="accepted for DeepSpeed compatibility (nothing to do)")
    args = parser.parse_args(argv)
    try:
        tag = convert(args.input_folder, args.output_folder)
    except (FileNotFoundError, FileExistsError) as err:
        sys.stderr.write(f"ds_to_universal: error: {err}\n")
        return 2
    print(f"shardwise checkpoints are universal already: copied to {args.output_folder}, latest_universal = {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
