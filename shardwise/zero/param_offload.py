"""Where a ZeRO-3 group's parameter shards live: device memory, pinned host memory, or a file (NVMe offload).

``offload_param.device``:
* ``none`` — ``ResidentStore`` on the device;
* ``cpu`` — ``ResidentStore`` in (pinned) host memory; each gather first copies the shard to the device;
* ``nvme`` — ``NvmeStore``: the shards are a file under ``nvme_path`` and are *not* resident. Reads are issued
  ahead of need by a small thread pool (``os.pread`` releases the GIL), in the order the prefetch trace predicts;
  after the optimizer step the updated shards are written back. Only the in-flight reads (at most
  ``buffer_count`` of them) occupy memory.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


class ResidentStore:
    """Shards held in memory (device, or host with ``offload_param: cpu``)."""

    resident = True

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device, compute_device: torch.device,
                 pin: bool = False) -> None:
        self.tensor = torch.zeros(numel, dtype=dtype, device=device)
        if pin and device.type == "cpu" and compute_device.type != "cpu":
            from shardwise.accelerator import get_accelerator

            self.tensor = get_accelerator().pin_memory(self.tensor)
        self.compute_device = compute_device

    def view(self, offset: int, n: int) -> torch.Tensor:
        """The shard itself (writable)."""
        return self.tensor[offset : offset + n]

    def fetch(self, offset: int, n: int) -> torch.Tensor:
        """The shard on the compute device (a no-op view when it already lives there)."""
        return self.tensor[offset : offset + n].to(self.compute_device, non_blocking=True)

    def prefetch(self, offset: int, n: int) -> None:
        """Nothing to read ahead."""

    def write(self, offset: int, values: torch.Tensor) -> None:
        """Overwrite part of the shards."""
        self.tensor[offset : offset + values.numel()].copy_(values.reshape(-1))

    @property
    def resident_bytes(self) -> int:
        """Bytes held in memory."""
        return self.tensor.numel() * self.tensor.element_size()


class NvmeStore:
    """Shards in a file, read ahead asynchronously, written back after each optimizer step."""

    resident = False

    def __init__(self, numel: int, dtype: torch.dtype, directory: str, name: str, compute_device: torch.device,
                 pool: ThreadPoolExecutor, max_pending: int = 8) -> None:
        os.makedirs(directory, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix=f"{name}-", suffix=".shards", dir=directory)
        self.fd = fd
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        os.ftruncate(fd, numel * self.itemsize)
        self.compute_device = compute_device
        self.pool = pool
        self.max_pending = max_pending
        self._pending: dict[int, Future] = {}
        self.bytes_read = 0
        self.bytes_written = 0

    def view(self, offset: int, n: int) -> None:
        """Not resident: there is no view."""
        return None

    def _read(self, offset: int, n: int) -> torch.Tensor:
        buf = torch.empty(n, dtype=self.dtype)
        got = os.preadv(self.fd, [_as_bytes(buf)], offset * self.itemsize)
        if got != n * self.itemsize:
            raise OSError(f"short read from {self.path}: {got} of {n * self.itemsize} bytes at element {offset}")
        self.bytes_read += got
        return buf

    def prefetch(self, offset: int, n: int) -> None:
        """Start reading a shard in the background (bounded number of reads in flight)."""
        if offset not in self._pending and len(self._pending) < self.max_pending:
            self._pending[offset] = self.pool.submit(self._read, offset, n)

    def fetch(self, offset: int, n: int) -> torch.Tensor:
        """The shard on the compute device (waits for its read-ahead, or reads now)."""
        future = self._pending.pop(offset, None)
        values = future.result() if future is not None else self._read(offset, n)
        return values.to(self.compute_device, non_blocking=True)

    def write(self, offset: int, values: torch.Tensor) -> None:
        """Write part of the shards to the file (drops any stale read-ahead)."""
        self._pending.pop(offset, None)
        data = values.detach().reshape(-1).to("cpu", self.dtype)
        written = os.pwritev(self.fd, [_as_bytes(data)], offset * self.itemsize)
        self.bytes_written += written

    def write_async(self, offset: int, values: torch.Tensor) -> Future:
        """``write`` on the I/O pool; the caller keeps the future and waits for it before reading that range."""
        self._pending.pop(offset, None)
        return self.pool.submit(self.write, offset, values.detach().reshape(-1))

    def drop_pending(self) -> None:
        """Forget read-aheads (the weights are about to change)."""
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()

    @property
    def resident_bytes(self) -> int:
        """Nothing is resident."""
        return 0

    def close(self) -> None:
        """Delete the file."""
        try:
            os.close(self.fd)
            os.unlink(self.path)
        except OSError:
            pass

    def __del__(self) -> None:
        self.close()


def make_store(numel: int, dtype: torch.dtype, compute_device: torch.device, offload: Any, name: str,
               pool: ThreadPoolExecutor | None) -> ResidentStore | NvmeStore:
    """The store for ``offload_param`` (None, or its config section)."""
    device = getattr(offload, "device", "none") if offload is not None else "none"
    if device == "nvme":
        path = getattr(offload, "nvme_path", None)
        if not path:
            raise ValueError("zero_optimization.offload_param.device is 'nvme' but nvme_path is not set; "
                             "set offload_param.nvme_path to a directory on a fast local disk")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return NvmeStore(numel, dtype, os.path.join(path, f"shardwise-rank{rank}"), name, compute_device, pool,
                         max_pending=int(getattr(offload, "buffer_count", 5)) * 2)
    host = torch.device("cpu") if device == "cpu" else compute_device
    return ResidentStore(numel, dtype, host, compute_device, pin=bool(getattr(offload, "pin_memory", False)))
