"""Checkpoint exceptions: each message names the file or entry at fault and what to do about it."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read as asked; the message says why and how to fix it."""


class CheckpointCorruptError(CheckpointError):
    """A file listed in the manifest is missing, truncated, altered or not a safetensors file."""


class CheckpointIncompleteError(CheckpointError):
    """A tag directory has no committed manifest (its save never finished) or is not a shardwise checkpoint."""


class CheckpointArgumentError(CheckpointError, ValueError):
    """A checkpoint call got an unusable argument (``save_dir=None``, a tag with a ``/``); a ValueError, as DeepSpeed
    raises for these."""
