"""``deepspeed.runtime.pipe``: DeepSpeed's import path for the pipeline classes (implemented in ``shardwise.pipe``).

Submodules (``module``, ``topology``, ``engine``, ``schedule``) load on first attribute access, so
``deepspeed.runtime.pipe.topology.PipeModelDataParallelTopology`` resolves without an explicit import.
"""

from __future__ import annotations

import importlib
from typing import Any

from shardwise.pipe import LayerSpec, PipelineModule, ProcessTopology, TiedLayerSpec

__all__ = ["LayerSpec", "PipelineModule", "ProcessTopology", "TiedLayerSpec"]


def __getattr__(name: str) -> Any:
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = module
    return module
