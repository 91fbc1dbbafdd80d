"""``SaveJob``: write one rank's files, and (rank 0) commit the checkpoint. No collectives: callable from a thread.

[Note: commit protocol]
1. Every rank writes its shard ``rank<r>-<save_id>.safetensors`` then its index ``rank<r>-<save_id>.json``, each to a
   temporary name, fsynced, renamed. The index is the rank's completion marker (it records the shard's size and
   sha256, so it cannot exist before the shard is durable).
2. Rank 0 waits until every rank's index exists (synchronous save: a collective already guaranteed it;
   asynchronous save: it polls, with a bounded wait, and gives up early if a rank left a ``.failed`` marker),
   merges them into ``manifest.json`` and renames that into place: **the commit**. A tag directory without a
   manifest is an unfinished save and is never loaded.
3. Only then does ``latest`` move (also write-temp-and-rename). Files of replaced or crashed saves of the same tag
   are deleted last. A crash at any point leaves ``latest`` naming a committed checkpoint.
Re-saving an existing tag writes under a new ``save_id`` and swaps the manifest, so the old copy stays loadable
until the new one is committed.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from shardwise.checkpoint.collect import RankSnapshot
from shardwise.checkpoint.errors import CheckpointError
from shardwise.checkpoint.files import (
    FORMAT,
    LATEST,
    MANIFEST,
    build_manifest,
    failure_marker_name,
    rank_index_name,
    shard_name,
    stale_files,
    write_safetensors,
)
from shardwise.checkpoint.safety import (
    atomic_write_bytes,
    atomic_write_json,
    check_size,
    fault_point,
)

RECOVERY_SCRIPT = "zero_to_fp32.py"
_SCRIPT = '''#!/usr/bin/env python
"""Consolidate a shardwise checkpoint in this directory into one fp32 state dict (safetensors).

    python zero_to_fp32.py . OUTPUT_DIR [--tag TAG] [--max_shard_size 5GB] [--exclude_frozen_parameters]

The same as the `shardwise-to-fp32` command.
"""
from shardwise.checkpoint.consolidate import main

if __name__ == "__main__":
    raise SystemExit(main())
'''


@dataclass
class SaveJob:
    """One rank's part of saving tag ``tag`` into ``save_dir`` (see [Note: commit protocol])."""

    save_dir: str
    tag: str
    save_id: str
    rank: int
    world_size: int
    snapshot: RankSnapshot
    save_latest: bool
    commit_timeout: float = 1800.0

    @property
    def tag_dir(self) -> str:
        """Directory of this tag."""
        return os.path.join(self.save_dir, self.tag)

    def _path(self, name: str) -> str:
        return os.path.join(self.tag_dir, name)

    def write_rank_files(self) -> None:
        """Write this rank's shard, then its index (the completion marker)."""
        os.makedirs(self.tag_dir, exist_ok=True)
        name = shard_name(self.rank, self.save_id)
        info = write_safetensors(self._path(name), self.snapshot.specs,
                                 {"format": FORMAT, "rank": str(self.rank), "save_id": self.save_id})
        fault_point("shard-written")
        index = {**self.snapshot.index, "save_id": self.save_id, "file": {"name": name, **info}}
        atomic_write_json(self._path(rank_index_name(self.rank, self.save_id)), index)
        fault_point("rank-written")

    def mark_failed(self, error: BaseException) -> None:
        """Leave a marker so rank 0 stops waiting for this rank's index."""
        with contextlib.suppress(OSError):
            os.makedirs(self.tag_dir, exist_ok=True)
            atomic_write_bytes(self._path(failure_marker_name(self.rank, self.save_id)), repr(error).encode())

    def _wait_for_index(self, rank: int, poll: bool) -> dict:
        import json

        path = self._path(rank_index_name(rank, self.save_id))
        failed = self._path(failure_marker_name(rank, self.save_id))
        deadline = time.monotonic() + self.commit_timeout
        delay = 0.005
        while not os.path.exists(path):
            if os.path.exists(failed):
                raise CheckpointError(f"rank {rank} failed to write its part of checkpoint {self.tag_dir}; "
                                      "not committed (see that rank's log)")
            if not poll or time.monotonic() > deadline:
                raise CheckpointError(f"rank {rank}'s files for checkpoint {self.tag_dir} did not appear "
                                      f"({path}); not committed. Is {self.save_dir} shared by all nodes?")
            time.sleep(delay)  # bounded: the loop ends at the deadline
            delay = min(delay * 2, 0.1)
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def commit(self, poll: bool) -> dict:
        """Rank 0: merge every rank's index into the manifest, commit it, move ``latest``, clean up. Returns it."""
        indexes = [self._wait_for_index(r, poll) for r in range(self.world_size)]
        fault_point("before-commit")
        manifest = build_manifest(indexes, tag=self.tag, save_id=self.save_id)
        for f in manifest["files"]:
            check_size(self._path(f["name"]), f["bytes"])
        atomic_write_json(self._path(MANIFEST), manifest)
        fault_point("manifest-written")
        if self.save_latest:
            atomic_write_bytes(os.path.join(self.save_dir, LATEST), self.tag.encode())
        script = os.path.join(self.save_dir, RECOVERY_SCRIPT)
        if not os.path.exists(script):
            atomic_write_bytes(script, _SCRIPT.encode())
        leftovers = stale_files(self.tag_dir, self.save_id)
        leftovers += [self._path(rank_index_name(r, self.save_id)) for r in range(self.world_size)]
        for path in leftovers:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return manifest
