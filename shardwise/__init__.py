"""shardwise: distributed training and inference for PyTorch, drop-in for DeepSpeed (``import shardwise as deepspeed``).

Only the public surface lives here; subpackages load on first use so ``import shardwise`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "get_accelerator": ("shardwise.accelerator", "get_accelerator"),
    "init_distributed": ("shardwise.comm", "init_distributed"),
    "initialize": ("shardwise.api", "initialize"),
    "add_config_arguments": ("shardwise.config", "add_config_arguments"),
    "init_inference": ("shardwise.inference", "init_inference"),
    "InferenceEngine": ("shardwise.inference", "InferenceEngine"),
    "OnDevice": ("shardwise.inference", "OnDevice"),
    "default_inference_config": ("shardwise.inference", "default_inference_config"),
    "PipelineModule": ("shardwise.pipe", "PipelineModule"),
    "LayerSpec": ("shardwise.pipe", "LayerSpec"),
    "TiedLayerSpec": ("shardwise.pipe", "TiedLayerSpec"),
    "DeepSpeedEngine": ("shardwise.engine", "Engine"),
    "Engine": ("shardwise.engine", "Engine"),
    "ShardwiseConfig": ("shardwise.config", "ShardwiseConfig"),
    "tp_model_init": ("shardwise.tp.autotp", "tp_model_init"),
    "__git_hash__": ("shardwise.git_version_info", "git_hash"),
    "__git_branch__": ("shardwise.git_version_info", "git_branch"),
}
_SUBMODULES = {"zero", "checkpointing", "pipe", "comm", "ops", "utils", "runtime", "accelerator", "inference",
               "config", "sequence", "tp", "sp", "checkpoint", "launcher", "models", "monitor", "profiling",
               "alias", "git_version_info"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        value = importlib.import_module(f"shardwise.{name}")
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shardwise' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
