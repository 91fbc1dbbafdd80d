"""``FlatGroup``: one optimizer group's trainable parameters stored in a single flat buffer.

Each parameter's ``.data`` becomes a view into the flat buffer, so collectives move whole buckets in place (see
``layout.py``'s [Note: bucket-interleaved partitions]). The group also owns the gradient storage its policy needs:
a full gradient buffer (stages 0/1, the BF16 optimizer), the rank's reduced gradient partition (stages 1/2), and
the fp32 master partition (mixed precision, ZeRO). Only views and storage live here; when and how gradients move
is ``reducer.py``'s job, and stepping is ``flat_optimizer.py``'s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shardwise import comm
from shardwise.accelerator import get_accelerator
from shardwise.zero.layout import FlatLayout


def copy_master(values: torch.Tensor, device: torch.device, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A master-weight copy of ``values``: ``dtype`` on ``device``, in pinned memory when asked and on the host."""
    master = values.detach().to(device=device, dtype=dtype, copy=True)
    return get_accelerator().pin_memory(master) if pin and device.type == "cpu" else master


def master_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """fp32 masters for fp32/bf16/fp16 models; float64 models (exactness tests) keep float64."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


class FlatGroup:
    """Trainable parameters of one optimizer group, flattened."""

    def __init__(self, params: list[nn.Parameter], layout: FlatLayout, rank: int) -> None:
        if not params:
            raise ValueError("a FlatGroup needs at least one parameter")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"parameters of one optimizer group must share dtype and device, got {dtypes} {devices}")
        self.params = params
        self.layout = layout
        self.rank = rank
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.flat = torch.zeros(layout.total, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for slot, p in zip(layout.slots, params):
                view = self.flat[slot.offset : slot.offset + slot.numel]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
        self.full_grad: torch.Tensor | None = None  # full-size accumulation buffer (stages 0/1)
        self.part_grad: torch.Tensor | None = None  # this rank's reduced gradients (stages 1/2)
        self.master: torch.Tensor | None = None  # fp32 master partition (or full copy at stage 0 + fp16)

    # -- views ----------------------------------------------------------------------------------------------------
    def param_view(self, buf: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter ``index``'s region of a full-size buffer, shaped like the parameter."""
        slot = self.layout.slots[index]
        return buf[slot.offset : slot.offset + slot.numel].view_as(self.params[index])

    def bucket_view(self, buf: torch.Tensor, bucket: int) -> torch.Tensor:
        """A bucket's region of a full-size buffer."""
        b = self.layout.buckets[bucket]
        return buf[b.start : b.start + b.size]

    def shard_view(self, buf: torch.Tensor, bucket: int) -> torch.Tensor:
        """This rank's slice of a bucket in a full-size buffer."""
        lo, hi = self.layout.buckets[bucket].shard_range(self.rank)
        return buf[lo:hi]

    def part_view(self, part: torch.Tensor, bucket: int) -> torch.Tensor:
        """A bucket's slice inside a partition-size buffer."""
        b = self.layout.buckets[bucket]
        off = self.layout.bucket_partition_offset(bucket)
        return part[off : off + b.shard_size]

    def param_shard_of_flat(self) -> torch.Tensor:
        """This rank's partition of the model-dtype parameters, gathered into one tensor (a copy)."""
        return torch.cat([self.shard_view(self.flat, b.index) for b in self.layout.buckets])

    # -- storage --------------------------------------------------------------------------------------------------
    def allocate_full_grad(self, dtype: torch.dtype, as_param_grads: bool) -> None:
        """A zeroed full-size gradient buffer; with ``as_param_grads`` every ``p.grad`` becomes a view into it."""
        self.full_grad = torch.zeros(self.layout.total, dtype=dtype, device=self.device)
        if as_param_grads:
            for i, p in enumerate(self.params):
                p.grad = self.param_view(self.full_grad, i)

    def allocate_part_grad(self, dtype: torch.dtype) -> None:
        """A zeroed buffer for this rank's reduced gradient partition."""
        self.part_grad = torch.zeros(self.layout.partition_numel, dtype=dtype, device=self.device)

    def allocate_master(self, device: torch.device, partitioned: bool, pin: bool = False,
                        dtype: torch.dtype | None = None, may_alias: bool = False) -> None:
        """The master weights (fp32 unless ``dtype``): this rank's partition (ZeRO) or a full copy (stage 0, fp16).

        With ``may_alias`` (the optimizer is not offloaded), a ZeRO group of one rank whose parameters already
        have the master dtype on ``device`` steps the flat buffer itself: its partition is the whole buffer, so a
        copy would only double the weights' memory (AutoTP or pipeline stages with no data parallelism, fp32)."""
        dtype = dtype or master_dtype(self.dtype)
        # one rank: every bucket's partition is the whole bucket, in buffer order, so the partition is the buffer
        if may_alias and partitioned and self.layout.world == 1 and not pin and device == self.flat.device \
                and dtype == self.dtype == master_dtype(self.dtype):
            self.master = self.flat
            return
        source = self.param_shard_of_flat() if partitioned else self.flat
        self.master = copy_master(source, device, dtype, pin)

    @property
    def master_is_flat(self) -> bool:
        """The master weights are the model's flat buffer itself (see ``allocate_master``)."""
        return self.master is self.flat

    @torch.no_grad()
    def publish_master(self, comm_group: Any, handles: list, max_inflight: int) -> None:
        """Cast the master weights into the model buffer: all-gather of each bucket's partitions, or a copy."""
        if self.master_is_flat:  # the optimizer stepped the model's weights in place
            return
        if self.master.numel() == self.flat.numel():  # not partitioned
            self.flat.copy_(self.master)
            return
        for b in self.layout.buckets:
            shard = self.part_view(self.master, b.index).to(device=self.device, dtype=self.dtype, non_blocking=True)
            handles.append(comm.all_gather_into_tensor(self.bucket_view(self.flat, b.index), shard,
                                                       group=comm_group, async_op=True))
            if len(handles) > max_inflight:
                handles.pop(0).wait()

    def numel(self) -> int:
        """Number of parameter elements (padding excluded)."""
        return self.layout.used_numel
