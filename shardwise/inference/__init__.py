"""Inference: ``init_inference`` with automatic tensor parallelism, per-rank sliced loading and graph capture.

DeepSpeed names resolve here: ``deepspeed.init_inference``, ``deepspeed.InferenceEngine``,
``deepspeed.inference.config.DeepSpeedInferenceConfig``, ``deepspeed.inference.engine.InferenceEngine``,
``deepspeed.OnDevice``, ``deepspeed.default_inference_config``. See docs/inference.md.
"""

from shardwise.inference.autotp import AutoTPError
from shardwise.inference.config import (
    DeepSpeedInferenceConfig,
    DeepSpeedTPConfig,
    default_inference_config,
    load_inference_config,
)
from shardwise.inference.engine import InferenceEngine, init_inference
from shardwise.inference.loader import CheckpointError
from shardwise.inference.on_device import OnDevice

__all__ = [
    "AutoTPError", "CheckpointError", "DeepSpeedInferenceConfig", "DeepSpeedTPConfig", "InferenceEngine",
    "OnDevice", "default_inference_config", "init_inference", "load_inference_config",
]
