"""Crash-safe file primitives: write to a temporary name, fsync, rename atomically, fsync the directory.

Temporary names say which process writes them (``stale.temporary_name``), so that those of a killed save can later
be told apart from those of a save in progress (see [Note: stale temporaries]).

Every checkpoint file goes through :func:`atomic_file`, so a reader sees either the previous complete file or the new
complete file, never a prefix. Directory entries are fsynced after renames so that a power cut cannot resurrect the
old name. ``sha256`` of every shard is computed while it is written (no second pass) and verified on load.

:func:`fault_point` is the one test seam: tests set ``FAULT_HOOK`` (a callable taking the point's name) to kill or
pause a rank at a precise moment of a save; it is ``None`` in normal runs and costs one attribute lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from shardwise.checkpoint.errors import CheckpointCorruptError
from shardwise.checkpoint.stale import TMP_PREFIX, temporary_name

__all__ = ["TMP_PREFIX", "HashingWriter", "atomic_file", "atomic_write_bytes", "atomic_write_json", "check_size",
           "fault_point", "fsync_dir", "sha256_file", "verify_file"]
_CHUNK = 8 * 1024 * 1024

#: Tests only: called with a point name ("shard-written", "before-commit", ...) during a save.
FAULT_HOOK: Callable[[str], None] | None = None


def fault_point(name: str) -> None:
    """Let a test interrupt the save here (no-op unless ``FAULT_HOOK`` is set)."""
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


def fsync_dir(path: str) -> None:
    """Make renames and creations inside directory ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class HashingWriter:
    """A write-only file wrapper that counts bytes and feeds them to sha256 as they pass."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> None:
        """Write ``data`` (bytes or any buffer) and account for it."""
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._f.write(view)
        self.size += view.nbytes

    def hexdigest(self) -> str:
        """sha256 of everything written so far."""
        return self._hash.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """Open a temporary sibling of ``path`` for binary writing; on success fsync it and rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, temporary_name(os.path.basename(path), secrets.token_hex(4)))
    f = open(tmp, "wb")  # noqa: SIM115 - closed below on every path
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: str, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as JSON, atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, allow_nan=True).encode())


def sha256_file(path: str) -> str:
    """sha256 of a file's contents, read in 8 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_size(path: str, size: int) -> None:
    """Raise ``CheckpointCorruptError`` naming ``path`` unless it exists with exactly ``size`` bytes."""
    try:
        actual = os.path.getsize(path)
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"checkpoint file {path} is missing (the manifest lists it); restore it from a copy of the checkpoint, "
            "or load an earlier tag"
        ) from None
    if actual != size:
        raise CheckpointCorruptError(
            f"checkpoint file {path} has {actual} bytes, the manifest says {size} (truncated or overwritten); "
            "restore it from a copy of the checkpoint, or load an earlier tag"
        )


def verify_file(path: str, size: int, sha256: str) -> None:
    """Check a file's size and sha256 against the manifest; raise ``CheckpointCorruptError`` naming it if not."""
    check_size(path, size)
    actual = sha256_file(path)
    if actual != sha256:
        raise CheckpointCorruptError(
            f"checkpoint file {path} is corrupted: sha256 {actual[:16]}... does not match the manifest's "
            f"{sha256[:16]}...; restore it from a copy of the checkpoint, or load an earlier tag"
        )
