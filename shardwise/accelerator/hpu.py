"""Intel Gaudi (HPU) accelerator: hccl, ``habana_frameworks`` imported lazily, HPU graphs. Untestable here; tiny."""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import torch

from shardwise.accelerator.base import Accelerator


def _hthpu() -> Any:
    """``habana_frameworks.torch.hpu``, imported on first use (it registers the hpu device and hccl backend)."""
    importlib.import_module("habana_frameworks.torch.distributed.hccl")
    return importlib.import_module("habana_frameworks.torch.hpu")


def habana_importable() -> bool:
    """Whether the Gaudi software stack is installed in this environment."""
    return importlib.util.find_spec("habana_frameworks") is not None


class HpuAccelerator(Accelerator):
    """Gaudi devices through the Habana PyTorch bridge."""

    _name = "hpu"
    _communication_backend = "hccl"

    def __init__(self) -> None:
        self._hpu = _hthpu()

    def is_available(self) -> bool:
        return bool(self._hpu.is_available())

    def device_count(self) -> int:
        return int(self._hpu.device_count())

    def current_device(self) -> int:
        return int(self._hpu.current_device())

    def set_device(self, device_index: int) -> None:
        self._hpu.set_device(device_index)

    def synchronize(self, device_index: int | None = None) -> None:
        self._hpu.synchronize()

    def Stream(self, **kwargs: Any) -> Any:  # noqa: N802
        return self._hpu.Stream(**kwargs)

    def Event(self, **kwargs: Any) -> Any:  # noqa: N802
        return self._hpu.Event(**kwargs)

    def current_stream(self, device_index: int | None = None) -> Any:
        return self._hpu.current_stream()

    def default_stream(self, device_index: int | None = None) -> Any:
        return self._hpu.default_stream()

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return self._hpu.stream(stream)

    def memory_allocated(self, device_index: int | None = None) -> int:
        return int(self._hpu.memory_allocated())

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        return int(self._hpu.max_memory_allocated())

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        self._hpu.reset_peak_memory_stats()

    def total_memory(self, device_index: int | None = None) -> int:
        return int(self._hpu.memory_stats().get("Limit", 0))

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory(device="hpu")

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()

    def manual_seed(self, seed: int) -> None:
        self._hpu.random.manual_seed(seed)

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        return self._hpu.random.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, device_index: int | None = None) -> None:
        self._hpu.random.set_rng_state(state)

    def supports_graph_capture(self) -> bool:
        return True

    def create_graph(self) -> Any:
        return self._hpu.HPUGraph()

    def capture_to_graph(self, graph: Any, pool: Any = None, stream: Any = None) -> contextlib.AbstractContextManager:
        return self._hpu.graph(graph, pool=pool, stream=stream)

    def replay_graph(self, graph: Any) -> None:
        graph.replay()

    def visible_devices_envs(self) -> list[str]:
        return ["HABANA_VISIBLE_MODULES"]
