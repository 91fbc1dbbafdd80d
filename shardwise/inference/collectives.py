"""The two collectives of tensor-parallel inference (sum of partial outputs, gather of vocabulary slices), with a
shared-memory path for ranks on one host.

Decoding one token runs two all-reduces per block on a few kilobytes. Over gloo each costs ~150 us of socket
round trips, several times the matmuls they follow on a small model, so a tensor-parallel model would decode
slower than one process. ``SharedMemoryCollectives`` does the same exchange through one shared segment:

* every rank copies its tensor into its own slot and publishes a sequence number in its own cache line;
* each rank waits until every peer's number has reached the current one, then sums all slots *in rank order*
  (so every rank computes bitwise the same result; 16-bit inputs are summed in fp32 and rounded once, which is
  more accurate than a 16-bit ring all-reduce);
* slots are double-buffered by sequence parity: a rank can only reach round k+2 after every peer published round
  k+1, i.e. after every peer finished reading round k, so nothing is overwritten while it is read.

Publication order relies on x86's store ordering (data stores are visible before the later flag store), so the
path is used only on x86-64 CPUs, for groups whose ranks share a host and the cpu accelerator (device
collectives such as NCCL are fast already). ``SHARDWISE_INFERENCE_SHM=0`` turns it off. Otherwise, and for
tensors larger than a slot in an all-gather, ``TorchCollectives`` uses ``shardwise.comm`` (torch.distributed).
The segment is unlinked once every rank has mapped it, so nothing is left in /dev/shm, even after a crash.
"""

from __future__ import annotations

import os
import platform
import socket
import tempfile
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.comm.timeouts import group_timeout_seconds

_FLAG_STRIDE = 8  # int64 entries per flag: one 64-byte cache line per rank
SLOT_BYTES = 1 << 20


class TorchCollectives:
    """Collectives over ``shardwise.comm`` (any backend: gloo, nccl, hccl)."""

    kind = "torch.distributed"

    def __init__(self, group: Group) -> None:
        self.group = group

    def all_reduce_(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the group, in place."""
        comm.all_reduce(t, group=self.group)

    def all_gather_last(self, t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's ``t`` along the last dimension (``sizes``: each rank's extent)."""
        from shardwise.tp.mappings import all_gather_dim

        return all_gather_dim(t, self.group, -1, None if len(set(sizes)) == 1 else list(sizes))


class SharedMemoryCollectives:
    """Collectives through a shared-memory segment between the ranks of ``group`` (see the module docstring)."""

    kind = "shared memory"

    def __init__(self, group: Group, slot_bytes: int = SLOT_BYTES, timeout: float | None = None) -> None:
        self.group, self.world, self.rank = group, group.size, group.rank
        # the job's collective timeout (comms_config.timeout / SHARDWISE_COMM_TIMEOUT / 30 min), as over gloo
        self.slot_bytes = slot_bytes
        self.timeout = timeout if timeout is not None else group_timeout_seconds(group.torch_group)
        self.fallback = TorchCollectives(group)
        flag_bytes = self.world * _FLAG_STRIDE * 8
        self._data_offset = flag_bytes
        size = flag_bytes + 2 * self.world * slot_bytes
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        name = comm.broadcast_object(os.path.join(base, f"shardwise-tp-{uuid.uuid4().hex}")
                                     if self.rank == 0 else None, src=group.global_rank(0), group=group)
        if self.rank == 0:
            with open(name, "wb") as f:
                f.truncate(size)
        comm.barrier(group)
        self.buffer = torch.from_file(name, shared=True, size=size, dtype=torch.uint8)
        comm.barrier(group)
        if self.rank == 0:
            os.unlink(name)
        # flags through numpy: a scalar store or a min over a few int64 costs ~0.1-1 us, a torch op several us
        self._flags = self.buffer[:flag_bytes].numpy().view(np.int64)[::_FLAG_STRIDE]
        self._seq = 0
        self._views: dict[tuple, list[torch.Tensor]] = {}

    # -- the protocol ---------------------------------------------------------------------------------------------
    def _slots(self, parity: int, dtype: torch.dtype, numel: Sequence[int]) -> list[torch.Tensor]:
        key = (parity, dtype, tuple(numel))
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 256:  # many distinct shapes (prefills of varying length): start over
                self._views.clear()
            itemsize = torch.empty((), dtype=dtype).element_size()
            views = []
            for r in range(self.world):
                start = self._data_offset + (parity * self.world + r) * self.slot_bytes
                views.append(self.buffer[start:start + numel[r] * itemsize].view(dtype))
            self._views[key] = views
        return views

    def _publish_and_wait(self) -> None:
        flags, seq = self._flags, self._seq
        flags[self.rank] = seq
        spins, deadline = 0, None
        while flags.min() < seq:
            spins += 1
            if spins > 32:
                os.sched_yield()  # ranks may outnumber cores (4 ranks on 2 cores): let the peers run
            if spins % 4096 == 0:
                deadline = deadline or time.monotonic() + self.timeout
                if time.monotonic() > deadline:
                    late = [r for r in range(self.world) if int(self._flags[r]) < self._seq]
                    raise RuntimeError(f"tensor-parallel shared-memory collective timed out after {self.timeout:.0f}"
                                       f"s waiting for group ranks {late} (round {self._seq}); a peer stopped or "
                                       "is running different code (the timeout is the job's collective timeout: "
                                       "comms_config.timeout / SHARDWISE_COMM_TIMEOUT); set "
                                       "SHARDWISE_INFERENCE_SHM=0 to use torch.distributed instead")

    def all_reduce_(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the group, in place (rank-order sum, identical on every rank)."""
        flat = t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)
        cap = self.slot_bytes // t.element_size()
        wide = t.dtype in (torch.float16, torch.bfloat16)
        for start in range(0, flat.numel(), cap):
            piece = flat[start:start + cap]
            self._seq += 1
            slots = self._slots(self._seq % 2, t.dtype, [piece.numel()] * self.world)
            slots[self.rank].copy_(piece)
            self._publish_and_wait()
            if wide:
                acc = slots[0].float()
                for other in slots[1:]:
                    acc += other
                piece.copy_(acc)
            else:
                torch.add(slots[0], slots[1], out=piece)
                for other in slots[2:]:
                    piece += other
        if not t.is_contiguous():
            t.copy_(flat.view_as(t))

    def all_gather_last(self, t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's ``t`` along the last dimension (``sizes``: each rank's extent)."""
        lead = t.shape[:-1]
        rows = t.numel() // max(1, t.shape[-1])
        if rows * max(sizes) * t.element_size() > self.slot_bytes:
            return self.fallback.all_gather_last(t, sizes)
        self._seq += 1
        slots = self._slots(self._seq % 2, t.dtype, [rows * s for s in sizes])
        slots[self.rank].copy_(t.reshape(-1))
        self._publish_and_wait()
        return torch.cat([s.view(*lead, n) for s, n in zip(slots, sizes)], dim=-1)


def make_collectives(group: Group, accelerator: Any) -> TorchCollectives | SharedMemoryCollectives | None:
    """The fastest collectives for ``group``: shared memory when its ranks share an x86 host on the cpu
    accelerator (and ``SHARDWISE_INFERENCE_SHM`` is not 0), else torch.distributed; None for one rank."""
    if group.size == 1:
        return None
    wanted = os.environ.get("SHARDWISE_INFERENCE_SHM", "1") != "0"
    eligible = wanted and accelerator.device_name() == "cpu" and platform.machine().lower() in ("x86_64", "amd64")
    hosts = comm.all_gather_object(socket.gethostname() if eligible else None, group=group)
    if eligible and all(h == hosts[0] for h in hosts):
        return SharedMemoryCollectives(group)
    return TorchCollectives(group)
