"""``FlatMuonGroup``: Muon on a ZeRO partition, where a rank holds pieces of weights, not whole matrices.

[Note: Muon on flat partitions]
The rank's Muon group is one flat tensor (its partition of the fp32 masters). Each weight of the group lies in it
as at most a few contiguous *pieces* ``(member, elem_start, elem_end, offset)``, read once from the strategy's
``fragments`` (so this works for every stage without knowing its buffers). Every rank learns every rank's pieces
with two small all-gathers at bind time. Per step, the elementwise part (momentum, Nesterov blend) runs on the
partition; then, chunk by chunk (at most ``CHUNK_NUMEL`` elements of weights), each rank packs its pieces of the
chunk's weights and one ``all_gather`` hands every rank every piece; a rank rebuilds only the matrices it holds
part of, orthogonalises them, and keeps its own pieces of the result. One all-gather of the Muon weights' volume
per step (what DeepSpeed's ZeRO-1/2 Muon also moves), Newton-Schulz run once per matrix per holding rank, and
momentum state sharded like every other optimizer state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from shardwise import comm
from shardwise.ops.newton_schulz import lr_ratio, matrix_shape, orthogonalize
from shardwise.ops.newton_schulz import ns_dtype as _ns_dtype

if TYPE_CHECKING:
    from shardwise.engine.strategy import ShardingStrategy


CHUNK_NUMEL = 1 << 26  # weights' elements gathered per collective (256 MiB in fp32): bounds the transient memory


def _pieces(flat: Tensor, members: list[Tensor], strategy: ShardingStrategy) -> list[tuple[int, int, int, int]]:
    out = []
    base, size = flat.data_ptr(), flat.element_size()
    for k, p in enumerate(members):
        for frag in strategy.fragments(p):
            view = frag.fp32
            if view is None or view.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
                raise RuntimeError("Muon: a weight's fp32 fragment is not a view of its group's flat partition; this "
                                   "ZeRO layout is not supported with Muon")
            out.append((k, frag.start, frag.end, (view.data_ptr() - base) // size))
    return out


def _all_tables(local: list[tuple[int, int, int, int]], group: Any, device: torch.device) -> list[list[tuple]]:
    """Every rank's piece table (two all-gathers: counts, then the padded tables)."""
    if group.size == 1:
        return [local]
    count = torch.tensor([len(local)], dtype=torch.int64, device=device)
    counts = torch.empty(group.size, dtype=torch.int64, device=device)
    comm.all_gather_into_tensor(counts, count, group=group)
    most = int(counts.max().item())
    table = torch.full((most, 4), -1, dtype=torch.int64, device=device)
    if local:
        table[: len(local)] = torch.tensor(local, dtype=torch.int64, device=device)
    tables = torch.empty(group.size * most, 4, dtype=torch.int64, device=device)
    comm.all_gather_into_tensor(tables, table, group=group)
    rows = tables.view(group.size, most, 4).tolist()
    return [[tuple(r) for r in rows[i][: int(counts[i])]] for i in range(group.size)]


class FlatMuonGroup:
    """Where the Muon weights' pieces lie on every rank, and the per-step gather + orthogonalisation."""

    def __init__(self, flat: Tensor, members: list[Tensor], shapes: list[torch.Size],
                 strategy: ShardingStrategy) -> None:
        self.flat = flat
        self.shapes = shapes
        self.group = strategy.state_group
        local = _pieces(flat, members, strategy)
        self.tables = _all_tables(local, self.group, flat.device)
        self.mine = sorted({k for k, *_ in local})
        numels = [int(torch.Size(s).numel()) for s in shapes]
        self.chunks: list[list[int]] = []
        filled = 0
        for k, n in enumerate(numels):
            if not self.chunks or filled + n > CHUNK_NUMEL:
                self.chunks.append([])
                filled = 0
            self.chunks[-1].append(k)
            filled += n

    def _gather(self, update: Tensor, chunk: list[int]) -> dict[int, Tensor]:
        """Full flattened blends of the chunk's weights this rank holds part of."""
        members = set(chunk)
        per_rank = [[pc for pc in table if pc[0] in members] for table in self.tables]
        lengths = [sum(e - s for _, s, e, _ in pcs) for pcs in per_rank]
        width = max(lengths)
        if width == 0:  # only empty weights in this chunk (the same decision on every rank: tables are global)
            return {}
        mine = per_rank[self.group.rank]
        send = torch.zeros(width, dtype=update.dtype, device=update.device)
        pos = 0
        for _, s, e, off in mine:
            send[pos:pos + e - s] = update[off:off + e - s]
            pos += e - s
        if self.group.size > 1:
            recv = torch.empty(self.group.size * width, dtype=update.dtype, device=update.device)
            comm.all_gather_into_tensor(recv, send, group=self.group)
            recv = recv.view(self.group.size, width)
        else:
            recv = send.view(1, width)
        wanted = {k for k, *_ in mine}
        full = {k: torch.zeros(torch.Size(self.shapes[k]).numel(), dtype=update.dtype, device=update.device)
                for k in wanted}
        for r, pcs in enumerate(per_rank):
            pos = 0
            for k, s, e, _ in pcs:
                if k in full:
                    full[k][s:e] = recv[r, pos:pos + e - s]
                pos += e - s
        return full

    def directions(self, update: Tensor, group: dict[str, Any]) -> Tensor:
        """This partition's slice of ``ratio * NS(full blend)`` for every weight (zeros on padding)."""
        out = torch.zeros_like(update)
        local = self.tables[self.group.rank]
        for chunk in self.chunks:
            for k, full in self._gather(update, chunk).items():
                rows, cols = matrix_shape(self.shapes[k])
                ortho = orthogonalize(full.view(rows, cols), steps=group["ns_steps"], method=group["ns_method"],
                                      coefficients=group["ns_coefficients"], dtype=_ns_dtype(group, full))
                ortho = ortho.to(update.dtype).reshape(-1) * lr_ratio(rows, cols, group["adjust_lr_fn"])
                for kk, s, e, off in local:
                    if kk == k:
                        out[off:off + e - s] = ortho[s:e]
        return out


__all__ = ["CHUNK_NUMEL", "FlatMuonGroup"]
