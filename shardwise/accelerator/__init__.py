"""Accelerator selection: ``get_accelerator()`` returns the one device family this process uses.

Chosen, in order, by ``SHARDWISE_ACCELERATOR``, then DeepSpeed's ``DS_ACCELERATOR``, then detection (hpu if the
Gaudi stack is installed and reports a device, cuda if torch sees a GPU, else cpu). A requested accelerator that
is not present is an error naming what was asked for and what exists, never a silent fallback.
"""

from __future__ import annotations

import os

from shardwise.accelerator.base import Accelerator

__all__ = ["Accelerator", "AcceleratorError", "get_accelerator", "is_current_accelerator_supported",
           "set_accelerator", "KNOWN_ACCELERATORS"]

KNOWN_ACCELERATORS = ("cpu", "cuda", "hpu")
_ENV_VARS = ("SHARDWISE_ACCELERATOR", "DS_ACCELERATOR")

_current: Accelerator | None = None


class AcceleratorError(RuntimeError):
    """The requested accelerator is unknown or not present on this machine."""


def _build(name: str, source: str) -> Accelerator:
    if name == "cpu":
        from shardwise.accelerator.cpu import CpuAccelerator

        return CpuAccelerator()
    if name == "cuda":
        from shardwise.accelerator.cuda import CudaAccelerator

        acc = CudaAccelerator()
        if not acc.is_available():
            raise AcceleratorError(
                f"{source} asks for the cuda accelerator, but torch sees no CUDA device "
                f"(torch {__import__('torch').__version__}, built with CUDA: "
                f"{__import__('torch').version.cuda}); set {_ENV_VARS[0]}=cpu or install a CUDA build of torch"
            )
        return acc
    if name == "hpu":
        from shardwise.accelerator import hpu

        if not hpu.habana_importable():
            raise AcceleratorError(
                f"{source} asks for the hpu accelerator, but habana_frameworks is not installed; "
                f"install the Intel Gaudi PyTorch bridge or set {_ENV_VARS[0]}=cpu"
            )
        acc = hpu.HpuAccelerator()
        if not acc.is_available():
            raise AcceleratorError(f"{source} asks for the hpu accelerator, but no Gaudi device is visible")
        return acc
    raise AcceleratorError(
        f"{source} names an unknown accelerator {name!r}; choose one of {', '.join(KNOWN_ACCELERATORS)}"
    )


def _detect() -> str:
    from shardwise.accelerator import hpu

    if hpu.habana_importable():
        try:
            if hpu.HpuAccelerator().is_available():
                return "hpu"
        except Exception:  # a broken Gaudi install must not stop a CPU/GPU run
            pass
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def get_accelerator() -> Accelerator:
    """The accelerator for this process (chosen once, then cached)."""
    global _current
    if _current is None:
        for var in _ENV_VARS:
            value = os.environ.get(var, "").strip().lower()
            if value:
                _current = _build(value, f"{var}={value}")
                break
        else:
            _current = _build(_detect(), "detection")
    return _current


def set_accelerator(accelerator: Accelerator | str | None) -> Accelerator | None:
    """Override the choice (an instance or a name); ``None`` forgets it so the next call chooses again."""
    global _current
    if isinstance(accelerator, str):
        accelerator = _build(accelerator.lower(), "set_accelerator()")
    _current = accelerator
    return _current


def is_current_accelerator_supported() -> bool:
    """Whether the accelerator this process selects (``get_accelerator()``) is one shardwise supports."""
    try:
        return get_accelerator().device_name() in KNOWN_ACCELERATORS
    except AcceleratorError:
        return False
