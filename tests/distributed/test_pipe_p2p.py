"""Stage-boundary transfers: handshake once, tuples of any dtype with requires-grad flags, varying shapes, and
tensor-parallel partitioning (each tensor rank sends 1/tp of a replicated tensor; the receiver all-gathers)."""

from __future__ import annotations

import pytest
import torch

from shardwise import comm
from shardwise.comm.topology import Topology
from shardwise.pipe.p2p import P2P, PipelineCommError
from tests.dist import run_ranks

CPU = torch.device("cpu")


def _boundary(scale: float, rows: int = 3) -> tuple[torch.Tensor, ...]:
    h = (torch.arange(rows * 5, dtype=torch.float32).view(rows, 5) * scale).requires_grad_(True)
    return (h * 2, torch.full((rows,), 7, dtype=torch.int64), torch.ones(2, dtype=torch.float64),
            torch.tensor([True, False]))


def _tuples_and_handshake() -> dict:
    topo = Topology(pp=2)
    p2p = P2P(topo, pipe_partitioned=True, grad_partitioned=True)
    comm.COMMS_LOG.reset()
    if topo.coord("pp") == 0:
        for scale in (1.0, 2.0):
            p2p.send(_boundary(scale), dst=1, tag=2)
        p2p.wait()
        return {"sends": comm.COMMS_LOG.totals(op="send").count}
    got = [p2p.recv(src=0, tag=2, device=CPU) for _ in range(2)]
    out = {"recvs": comm.COMMS_LOG.totals(op="recv").count}
    for scale, tensors in zip((1.0, 2.0), got):
        expected = _boundary(scale)
        assert [t.dtype for t in tensors] == [t.dtype for t in expected]
        assert [t.requires_grad for t in tensors] == [True, False, False, False]
        for a, b in zip(tensors, expected):
            assert torch.equal(a.detach(), b.detach())
    return out


def test_tuples_dtypes_and_grad_flags_with_one_handshake() -> None:
    sender, receiver = run_ranks(_tuples_and_handshake)
    assert sender["sends"] == 1 + 4 + 4  # header once, then 4 tensors per transfer
    assert receiver["recvs"] == 1 + 4 + 4


def _shapes(dynamic: bool) -> str:
    topo = Topology(pp=2)
    p2p = P2P(topo, pipe_partitioned=True, grad_partitioned=True, dynamic_shape=dynamic)
    rows = (2, 5, 3)
    if topo.coord("pp") == 0:
        try:
            for r in rows:
                p2p.send(_boundary(1.0, r), dst=1, tag=0)
        except PipelineCommError as exc:
            p2p.wait()
            return str(exc)
        p2p.reset()  # explicit renegotiation works in static mode too
        p2p.send(_boundary(1.0, 4), dst=1, tag=0)
        p2p.wait()
        return "sent"
    n = len(rows) + 1 if dynamic else 1
    got = [p2p.recv(src=0, tag=0, device=CPU)[0].shape[0] for _ in range(n)]
    if not dynamic:
        return str(got)
    p2p.reset()
    return str(got)


def test_varying_shapes_need_dynamic_shape() -> None:
    sender, receiver = run_ranks(_shapes, True)
    assert sender == "sent" and receiver == "[2, 5, 3, 4]"
    sender, receiver = run_ranks(_shapes, False)
    assert "changed from" in sender and "dynamic_shape=True" in sender and receiver == "[2]"


def _partitioned(enabled: bool) -> dict:
    topo = Topology(pp=2, tp=2)
    p2p = P2P(topo, pipe_partitioned=enabled, grad_partitioned=enabled)
    replicated = torch.arange(10, dtype=torch.float32).view(2, 5) + 0.5  # same on both tensor ranks
    per_rank = torch.full((3,), float(topo.coord("tp")))  # differs between tensor ranks: must go whole
    comm.COMMS_LOG.reset()
    if topo.coord("pp") == 0:
        for _ in range(2):
            p2p.send((replicated, per_rank), dst=topo.rank_at(pp=1), tag=0)
        p2p.wait()
        return {"bytes": comm.COMMS_LOG.totals(op="send").msg_bytes}
    for _ in range(2):
        a, b = p2p.recv(src=topo.rank_at(pp=0), tag=0, device=CPU)
        assert torch.equal(a, replicated) and torch.equal(b, per_rank)
    return {"gathered": comm.COMMS_LOG.totals(op="all_gather").msg_bytes}


@pytest.mark.world4
def test_pipe_partitioned_sends_one_slice_per_tensor_rank() -> None:
    header = 192 * 8
    full = run_ranks(_partitioned, False, world_size=4)
    split = run_ranks(_partitioned, True, world_size=4)
    # per transfer and sender: 10 + 3 floats whole, or 5 + 3 floats when the replicated tensor is split
    assert [r["bytes"] for r in full[:2]] == [header + 2 * 13 * 4] * 2
    assert [r["bytes"] for r in split[:2]] == [header + 2 * 8 * 4] * 2
    assert [r["gathered"] for r in split[2:]] == [2 * 10 * 4] * 2  # receivers rebuild the 10 floats
