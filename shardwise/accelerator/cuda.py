"""CUDA accelerator: nccl, torch.cuda streams/events/memory, CUDA graphs. Thin by design."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from shardwise.accelerator.base import Accelerator


class CudaAccelerator(Accelerator):
    """NVIDIA (and ROCm, which torch exposes as ``cuda``) devices."""

    _name = "cuda"
    _communication_backend = "nccl"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def set_device(self, device_index: int) -> None:
        count = torch.cuda.device_count()
        if not 0 <= device_index < count:
            # torch's own message ("invalid device ordinal") names neither the index nor where it came from
            from shardwise.accelerator import AcceleratorError

            raise AcceleratorError(
                f"cuda device index {device_index} asked for, but {count} device(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); the index is usually "
                "LOCAL_RANK: launch at most one rank per visible GPU (e.g. `shardwise --num_gpus N`), or "
                "widen CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(device_index)

    def synchronize(self, device_index: int | None = None) -> None:
        torch.cuda.synchronize(device_index)

    def Stream(self, **kwargs: Any) -> Any:  # noqa: N802
        return torch.cuda.Stream(**kwargs)

    def Event(self, **kwargs: Any) -> Any:  # noqa: N802
        return torch.cuda.Event(**kwargs)

    def current_stream(self, device_index: int | None = None) -> Any:
        return torch.cuda.current_stream(device_index)

    def default_stream(self, device_index: int | None = None) -> Any:
        return torch.cuda.default_stream(device_index)

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def memory_allocated(self, device_index: int | None = None) -> int:
        return torch.cuda.memory_allocated(device_index)

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        return torch.cuda.max_memory_allocated(device_index)

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        torch.cuda.reset_peak_memory_stats(device_index)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def total_memory(self, device_index: int | None = None) -> int:
        # None means the current device (as every other method here), not device 0
        index = self.current_device() if device_index is None else device_index
        return torch.cuda.get_device_properties(index).total_memory

    def memory_stats(self, device_index: int | None = None) -> dict[str, int]:
        stats = super().memory_stats(device_index)
        stats["reserved_bytes"] = torch.cuda.memory_reserved(device_index)
        return stats

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()

    def is_bf16_supported(self) -> bool:
        return torch.cuda.is_bf16_supported()

    def manual_seed(self, seed: int) -> None:
        torch.cuda.manual_seed(seed)

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        return torch.cuda.get_rng_state(device_index if device_index is not None else "cuda")

    def set_rng_state(self, state: torch.Tensor, device_index: int | None = None) -> None:
        torch.cuda.set_rng_state(state, device_index if device_index is not None else "cuda")

    def default_generator(self, device_index: int = 0) -> torch.Generator:
        return torch.cuda.default_generators[device_index]

    def supports_graph_capture(self) -> bool:
        return True

    def create_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def capture_to_graph(self, graph: Any, pool: Any = None, stream: Any = None) -> contextlib.AbstractContextManager:
        return torch.cuda.graph(graph, pool=pool, stream=stream)

    def replay_graph(self, graph: Any) -> None:
        graph.replay()

    def visible_devices_envs(self) -> list[str]:
        return ["CUDA_VISIBLE_DEVICES"]

    def export_envs(self) -> list[str]:
        return ["NCCL"]
