"""How a ZeRO-3 unit's shards are gathered and its gradients reduce-scattered.

* ``ShardComm``: one all-gather / reduce-scatter over the ZeRO group; this rank's shard is chunk ``group.rank``.
* ``HierarchicalShardComm`` (ZeRO++ hpZ, ``zero_hpz_partition_size`` = ranks per node): the group is M nodes x L
  local ranks. This rank's primary shard is chunk ``local * M + node`` of the flat unit, so that
  (1) an all-gather over the cross-node peers (one rank per node) yields the node's *secondary* chunk
  (``local``-th L-th of the unit), which is kept, and (2) an all-gather over the L ranks of the node yields the
  full unit. Forward does (1)+(2); backward and later forwards until the weights change do (2) only: no
  cross-node traffic. Gradients go the same way in reverse (reduce-scatter inside the node, then across nodes), so
  the cross-node volume is 1/L of a flat reduce-scatter.
* ``quantized_weights`` (qwZ) / ``quantized_gradients`` (qgZ): the collective that crosses nodes (the flat one when
  there is no hierarchy) carries blockwise int8 (``quantize.py``); qgZ reduces with an all-to-all of int8 chunks
  and sums the dequantized chunks in fp32.
Every method returns a handle with ``wait()``; results are valid only after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.zero import quantize as q


class Deferred:
    """A handle that waits for several collectives and then runs a finishing step (dequantize, next phase)."""

    def __init__(self, handles: list[Any], finish: Callable[[], Any] | None = None) -> None:
        self._handles, self._finish, self._done = handles, finish, False

    def wait(self) -> None:
        """Complete the collectives and the finishing step (once)."""
        if self._done:
            return
        self._done = True
        for h in self._handles:
            if h is not None:
                h.wait()
        if self._finish is not None:
            result = self._finish()
            if result is not None and hasattr(result, "wait"):
                result.wait()


def _quantized_all_gather(full: torch.Tensor, shard: torch.Tensor, group: Group, async_op: bool) -> Deferred:
    n = shard.numel()
    block = q.block_for(n)
    codes, scales = q.quantize(shard, block)
    all_codes = torch.empty(codes.numel() * group.size, dtype=torch.int8, device=shard.device)
    all_scales = torch.empty(scales.numel() * group.size, dtype=torch.float32, device=shard.device)
    h1 = comm.all_gather_into_tensor(all_codes, codes, group=group, async_op=True)
    h2 = comm.all_gather_into_tensor(all_scales, scales, group=group, async_op=True)

    def finish() -> None:
        per_codes, per_scales = codes.numel(), scales.numel()
        for r in range(group.size):
            values = q.dequantize(all_codes[r * per_codes : (r + 1) * per_codes],
                                  all_scales[r * per_scales : (r + 1) * per_scales], n, block)
            full[r * n : (r + 1) * n].copy_(values)

    d = Deferred([h1, h2], finish)
    if not async_op:
        d.wait()
    return d


def _quantized_reduce_scatter(out: torch.Tensor, full: torch.Tensor, group: Group, async_op: bool) -> Deferred:
    n = out.numel()
    block = q.block_for(n)
    rows = full.view(group.size, n)
    pieces = [q.quantize(rows[r], block) for r in range(group.size)]
    codes = torch.cat([c for c, _ in pieces])
    scales = torch.cat([s for _, s in pieces])
    recv_codes, recv_scales = torch.empty_like(codes), torch.empty_like(scales)
    h1 = comm.all_to_all_single(recv_codes, codes, group=group, async_op=True)
    h2 = comm.all_to_all_single(recv_scales, scales, group=group, async_op=True)

    def finish() -> None:
        per_codes, per_scales = codes.numel() // group.size, scales.numel() // group.size
        total = torch.zeros(n, dtype=torch.float32, device=out.device)
        for r in range(group.size):
            total += q.dequantize(recv_codes[r * per_codes : (r + 1) * per_codes],
                                  recv_scales[r * per_scales : (r + 1) * per_scales], n, block)
        out.copy_(total)

    d = Deferred([h1, h2], finish)
    if not async_op:
        d.wait()
    return d


class ShardComm:
    """Flat collectives over the ZeRO group."""

    def __init__(self, group: Group, quantized_weights: bool = False, quantized_gradients: bool = False) -> None:
        self.group = group
        self.world = group.size
        self.shard_index = group.rank
        self.quantized_weights = quantized_weights
        self.quantized_gradients = quantized_gradients

    def gather(self, full: torch.Tensor, shard: torch.Tensor, cache: dict[str, Any], async_op: bool = True) -> Any:
        """All-gather every rank's shard into ``full`` (``cache`` is unused without a hierarchy)."""
        if self.quantized_weights and self.world > 1:
            return _quantized_all_gather(full, shard, self.group, async_op)
        return comm.all_gather_into_tensor(full, shard, group=self.group, async_op=async_op)

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor, async_op: bool = True) -> Any:
        """Sum ``full`` over the group and leave this rank's shard in ``out``."""
        if self.quantized_gradients and self.world > 1:
            return _quantized_reduce_scatter(out, full, self.group, async_op)
        return comm.reduce_scatter_tensor(out, full, group=self.group, async_op=async_op)

    def invalidate(self, cache: dict[str, Any]) -> None:
        """Weights changed: drop anything derived from the old shards (nothing here)."""
        cache.clear()


class HierarchicalShardComm(ShardComm):
    """hpZ: a secondary, node-local partition makes every gather after the first stay inside the node."""

    def __init__(self, group: Group, intra: Group, inter: Group, quantized_weights: bool = False,
                 quantized_gradients: bool = False) -> None:
        super().__init__(group, quantized_weights, quantized_gradients)
        self.intra, self.inter = intra, inter
        self.shard_index = intra.rank * inter.size + inter.rank

    def gather(self, full: torch.Tensor, shard: torch.Tensor, cache: dict[str, Any], async_op: bool = True) -> Any:
        chunk = full.numel() // self.intra.size
        secondary = cache.get("secondary")
        if secondary is not None:
            return comm.all_gather_into_tensor(full, secondary, group=self.intra, async_op=async_op)
        secondary = torch.empty(chunk, dtype=full.dtype, device=full.device)
        if self.quantized_weights and self.inter.size > 1:
            first = _quantized_all_gather(secondary, shard, self.inter, async_op=True)
        else:
            first = comm.all_gather_into_tensor(secondary, shard, group=self.inter, async_op=True)

        def second() -> Any:
            cache["secondary"] = secondary
            return comm.all_gather_into_tensor(full, secondary, group=self.intra, async_op=False)

        d = Deferred([first], second)
        if not async_op:
            d.wait()
        return d

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor, async_op: bool = True) -> Any:
        chunk = torch.empty(full.numel() // self.intra.size, dtype=full.dtype, device=full.device)
        first = comm.reduce_scatter_tensor(chunk, full, group=self.intra, async_op=True)

        def second() -> Any:
            if self.quantized_gradients and self.inter.size > 1:
                return _quantized_reduce_scatter(out, chunk, self.inter, async_op=False)
            return comm.reduce_scatter_tensor(out, chunk, group=self.inter, async_op=False)

        d = Deferred([first], second)
        if not async_op:
            d.wait()
        return d
