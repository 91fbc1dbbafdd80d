"""CPU accelerator: gloo, synchronous execution, memory read from the process itself.

On CPU ``torch.accelerator`` reports no device, so CPU has its own explicit class. Memory statistics are the
process's resident set (RSS) and its high-water mark (Linux ``VmHWM``, resettable through ``/proc/self/clear_refs``),
because host tensors share the allocator with everything else in the process.
"""

from __future__ import annotations

import ctypes
import os
import re

import psutil

from shardwise.accelerator.base import Accelerator

_HWM_RE = re.compile(r"VmHWM:\s+(\d+)\s+kB")


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


_LIBC = _load_libc()


def _peak_rss_bytes() -> int:
    """High-water mark of the resident set, in bytes (falls back to the current RSS off Linux)."""
    try:
        with open("/proc/self/status") as f:
            match = _HWM_RE.search(f.read())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


class CpuAccelerator(Accelerator):
    """The reference implementation, used by every test on this machine."""

    _name = "cpu"
    _communication_backend = "gloo"

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        """The ranks on this node (``LOCAL_SIZE`` from the launcher, else torchrun's ``LOCAL_WORLD_SIZE``), else 1:
        DeepSpeed's CPU accelerator counts one "device" per local rank, and code checks
        ``world_size <= device_count()``."""
        for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
            value = os.environ.get(name, "").strip()
            if value.isdigit() and int(value) > 0:
                return int(value)
        return 1

    def current_device(self) -> int:
        return 0

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def memory_allocated(self, device_index: int | None = None) -> int:
        return psutil.Process().memory_info().rss

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        return max(_peak_rss_bytes(), self.memory_allocated())

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        # Writing "5" resets VmHWM to the current RSS (Linux >= 4.0); harmless where unsupported.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def empty_cache(self) -> None:
        # glibc keeps freed heap memory mapped (its mmap threshold grows after large frees), so a process that
        # frees a tensor keeps its RSS; malloc_trim hands free pages back, as empty_cache does for CUDA's cache.
        if _LIBC is not None:
            _LIBC.malloc_trim(0)

    def total_memory(self, device_index: int | None = None) -> int:
        return psutil.virtual_memory().total

    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        # fp16 matmuls run on CPU in torch >= 2.1 (slowly); dynamic loss scaling is exercised here in tests.
        return True

    def visible_devices_envs(self) -> list[str]:
        return []

    def export_envs(self) -> list[str]:
        return ["OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME"]

    def cpu_count(self) -> int:
        """Cores available to this process (affinity-aware)."""
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            return os.cpu_count() or 1
