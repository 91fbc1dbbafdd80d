"""Checkpoints: save and resume any layout exactly, load into a different layout, consolidate, never unpickle.

Format: ``files.py``; engine methods: ``engine.py``; offline consolidation (``zero_to_fp32``): ``consolidate.py``;
``utils.clone_tensors_for_torch_save`` as ``deepspeed.checkpoint.utils``. See docs/checkpoint.md.
"""

from shardwise.checkpoint import utils
from shardwise.checkpoint.engine import load_checkpoint, save_16bit_model, save_checkpoint, wait_for_checkpoint
from shardwise.checkpoint.errors import CheckpointCorruptError, CheckpointError, CheckpointIncompleteError

__all__ = ["CheckpointCorruptError", "CheckpointError", "CheckpointIncompleteError", "load_checkpoint",
           "save_16bit_model", "save_checkpoint", "utils", "wait_for_checkpoint"]
