"""``torch_autocast``: the forward pass (and the pipeline's loss) under ``torch.autocast``, DeepSpeed 0.17+'s mode.

The weights, gradients, master weights and optimizer states stay in the model's dtype (fp32 unless a ``bf16`` or
``fp16`` block casts it: DeepSpeed 0.18.3+ accepts the combination, and so does shardwise); only the forward's
operations run in ``torch_autocast.dtype`` where torch's autocast policy allows (matmuls yes, softmax and losses no),
and autograd runs their backward in the same dtypes. Exactly what a single-process ``with torch.autocast(...)`` loop
does, on every ZeRO stage and the pipeline.

- ``dtype``: ``"bf16"``/``"bfloat16"`` or ``"fp16"``/``"float16"``; null means torch's default for the device
  (bf16 on CPU, fp16 on CUDA).
- fp16 autocast over fp32 weights needs loss scaling (the activations' gradients are fp16): shardwise then uses a
  dynamic loss scale like ``torch.amp.GradScaler``'s (start 2**16, halve on overflow, double after 2000 clean steps),
  unless an ``fp16`` block configures one.
- ``lower_precision_safe_modules`` (class paths such as ``"torch.nn.Linear"``; DeepSpeed's default: Linear and
  Conv1d/2d/3d): DeepSpeed reduces these modules' gradients in the autocast dtype. shardwise validates the paths and
  keeps every gradient reduction in the gradients' own dtype (fp32 over fp32 weights): more precise, twice the bytes
  on the wire for those modules; ``communication_data_type`` opts every bucket into 16-bit communication.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from shardwise.config.errors import ConfigError

if TYPE_CHECKING:
    from shardwise.config import ShardwiseConfig


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SAFE_MODULES = ("torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d", "torch.nn.Conv3d")


def autocast_dtype(config: ShardwiseConfig, device_type: str) -> torch.dtype | None:
    """The autocast dtype, or None when ``torch_autocast`` is off."""
    block = config.torch_autocast
    if not block.enabled:
        return None
    if block.dtype is None:
        return torch.get_autocast_dtype(device_type)
    return _DTYPES[block.dtype]


def safe_module_classes(config: ShardwiseConfig) -> tuple[type, ...]:
    """The classes named by ``torch_autocast.lower_precision_safe_modules`` (DeepSpeed's default when null)."""
    names = config.torch_autocast.lower_precision_safe_modules
    out = []
    for name in DEFAULT_SAFE_MODULES if names is None else names:
        module_name, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr) if module_name else None
        except ImportError:
            cls = None
        if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
            raise ConfigError(
                f"torch_autocast.lower_precision_safe_modules: {name!r} is not an importable torch.nn.Module "
                "class. Fix: give full class paths such as \"torch.nn.Linear\"")
        out.append(cls)
    return tuple(out)


class Autocast:
    """The engine's autocast context (a no-op when ``torch_autocast`` is off)."""

    def __init__(self, config: ShardwiseConfig, device_type: str) -> None:
        self.device_type = device_type
        self.dtype = autocast_dtype(config, device_type)
        if self.dtype is not None:
            if self.dtype == torch.float32:
                raise ConfigError('torch_autocast.dtype = "fp32" makes autocast a no-op. Fix: "bf16" or "fp16", '
                                  "or set torch_autocast.enabled to false")
            if not torch.amp.is_autocast_available(device_type):
                raise ConfigError(f"torch_autocast.enabled = true, but torch has no autocast for device "
                                  f"{device_type!r}. Fix: set torch_autocast.enabled to false")
            self.safe_modules = safe_module_classes(config)

    @property
    def enabled(self) -> bool:
        """Whether forward runs under autocast."""
        return self.dtype is not None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            yield

    def needs_loss_scale(self, config: ShardwiseConfig) -> bool:
        """fp16 autocast without an ``fp16`` block: the engine adds a GradScaler-like dynamic loss scale."""
        return self.dtype == torch.float16 and not config.fp16.enabled
