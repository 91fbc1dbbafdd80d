"""The accelerator protocol: the one place that names device APIs.

Everything outside ``shardwise/accelerator/`` asks ``get_accelerator()`` instead of calling ``torch.cuda`` or
``habana_frameworks`` directly, so the same engine and the same ds_config run on CPU (gloo), CUDA (nccl) and Gaudi
(hccl). Each method is small and documented; implementations override what differs.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch


class NullStream:
    """A stream stand-in for devices whose work is synchronous (CPU): every operation completes at once."""

    def synchronize(self) -> None:  # noqa: D102 - trivial
        return None

    def wait_stream(self, other: Any) -> None:  # noqa: D102
        return None

    def wait_event(self, event: Any) -> None:  # noqa: D102
        return None

    def record_event(self, event: Any = None) -> NullEvent:  # noqa: D102
        return event if event is not None else NullEvent()

    def query(self) -> bool:  # noqa: D102
        return True


class NullEvent:
    """An event stand-in for synchronous devices; timing falls back to the wall clock (see utils/timers.py)."""

    def record(self, stream: Any = None) -> None:  # noqa: D102
        return None

    def synchronize(self) -> None:  # noqa: D102
        return None

    def wait(self, stream: Any = None) -> None:  # noqa: D102
        return None

    def query(self) -> bool:  # noqa: D102
        return True


class Accelerator(ABC):
    """What the engine needs from a device family. Names follow DeepSpeed's ``get_accelerator()`` methods."""

    #: short device family name used in ``torch.device`` strings ("cpu", "cuda", "hpu")
    _name: str = "abstract"
    #: torch.distributed backend for this device family
    _communication_backend: str = "gloo"

    # -- identity -------------------------------------------------------------------------------------------------
    def device_name(self, device_index: int | None = None) -> str:
        """``"cuda"`` or ``"cuda:1"``: the string torch uses for this device family (and index)."""
        return self._name if device_index is None else f"{self._name}:{device_index}"

    def device(self, device_index: int | None = None) -> torch.device:
        """A ``torch.device`` for the given index (the current one when None)."""
        index = self.current_device() if device_index is None else device_index
        return torch.device(self._name, index) if self._name != "cpu" else torch.device("cpu")

    def communication_backend_name(self) -> str:
        """The torch.distributed backend that pairs with this device: gloo, nccl or hccl."""
        return self._communication_backend

    @abstractmethod
    def is_available(self) -> bool:
        """Whether this device family is present and usable in this process."""

    @abstractmethod
    def device_count(self) -> int:
        """Number of devices of this family visible to the process."""

    @abstractmethod
    def current_device(self) -> int:
        """Index of the device this process uses."""

    @abstractmethod
    def set_device(self, device_index: int) -> None:
        """Bind this process to a device (called once per rank with its local rank)."""

    def current_device_name(self) -> str:
        """``device_name(current_device())``."""
        return self.device_name(self.current_device())

    # -- execution ------------------------------------------------------------------------------------------------
    @abstractmethod
    def synchronize(self, device_index: int | None = None) -> None:
        """Wait for all queued work on the device (timers call this before reading the clock)."""

    def Stream(self, **kwargs: Any) -> Any:  # noqa: N802 - DeepSpeed's name
        """A new side stream for overlapping communication or copies with compute."""
        return NullStream()

    def Event(self, **kwargs: Any) -> Any:  # noqa: N802 - DeepSpeed's name
        """A new event, usable for stream ordering and timing."""
        return NullEvent()

    def current_stream(self, device_index: int | None = None) -> Any:
        """The stream work is being queued on."""
        return NullStream()

    def default_stream(self, device_index: int | None = None) -> Any:
        """The device's default stream."""
        return NullStream()

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        """Context manager that makes ``stream`` current."""
        return contextlib.nullcontext()

    # -- memory ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def memory_allocated(self, device_index: int | None = None) -> int:
        """Bytes currently held by tensors (CPU: the process's resident set)."""

    @abstractmethod
    def max_memory_allocated(self, device_index: int | None = None) -> int:
        """Peak of ``memory_allocated`` since the last reset (CPU: peak resident set)."""

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        """Start a new peak-memory window."""
        return None

    def empty_cache(self) -> None:
        """Return cached blocks to the device allocator (CPU: freed heap pages back to the OS)."""
        return None

    def total_memory(self, device_index: int | None = None) -> int:
        """Capacity of one device in bytes."""
        return 0

    def memory_stats(self, device_index: int | None = None) -> dict[str, int]:
        """Allocator counters for the step log: allocated, peak, and reserved bytes."""
        return {
            "allocated_bytes": self.memory_allocated(device_index),
            "peak_bytes": self.max_memory_allocated(device_index),
        }

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        """Page-locked host copy for fast, asynchronous host<->device transfers (no-op without a device)."""
        return tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        """Whether a host tensor is page-locked."""
        return False

    # -- numerics -------------------------------------------------------------------------------------------------
    def is_bf16_supported(self) -> bool:
        """Whether bfloat16 compute is supported."""
        return True

    def is_fp16_supported(self) -> bool:
        """Whether float16 compute is supported."""
        return True

    def supported_dtypes(self) -> list[torch.dtype]:
        """Floating-point dtypes usable for model weights on this device."""
        dtypes = [torch.float32]
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        if self.is_fp16_supported():
            dtypes.append(torch.float16)
        return dtypes

    def manual_seed(self, seed: int) -> None:
        """Seed this device's random generator."""
        torch.manual_seed(seed)

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        """The device generator's state (CPU: torch's default generator)."""
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, device_index: int | None = None) -> None:
        """Restore a state returned by ``get_rng_state``."""
        torch.set_rng_state(state)

    def default_generator(self, device_index: int = 0) -> torch.Generator:
        """The device's default ``torch.Generator``."""
        return torch.default_generator

    # -- graphs ---------------------------------------------------------------------------------------------------
    def supports_graph_capture(self) -> bool:
        """Whether forward passes can be captured and replayed as a device graph (CUDA graphs, HPU graphs)."""
        return False

    def create_graph(self) -> Any:
        """A new, empty graph object (only when ``supports_graph_capture()``)."""
        raise RuntimeError(
            f"graph capture is not available on the {self._name} accelerator; "
            "run without enable_cuda_graph, or on a cuda/hpu device"
        )

    def capture_to_graph(self, graph: Any, pool: Any = None, stream: Any = None) -> contextlib.AbstractContextManager:
        """Context manager that records the enclosed kernels into ``graph``."""
        raise RuntimeError(f"graph capture is not available on the {self._name} accelerator")

    def replay_graph(self, graph: Any) -> None:
        """Run a captured graph again on its static buffers."""
        raise RuntimeError(f"graph capture is not available on the {self._name} accelerator")

    # -- misc -----------------------------------------------------------------------------------------------------
    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives on this device family."""
        return tensor.device.type == self._name

    def visible_devices_envs(self) -> list[str]:
        """Environment variables that restrict visible devices (the launcher sets them per rank)."""
        return []

    def export_envs(self) -> list[str]:
        """Prefixes of environment variables a multi-node launcher should forward (e.g. NCCL)."""
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} device={self._name} backend={self._communication_backend}>"
