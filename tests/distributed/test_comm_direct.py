"""The direct-exchange all-gather and reduce-scatter (gloo) against locally computed results and gloo's own ring."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks


def _data(rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(100 + rank)).to(dtype)


def _collectives(world: int) -> dict[str, bool]:
    from shardwise import comm
    from shardwise.comm import direct
    from shardwise.comm.group import world_group

    rank = dist.get_rank()
    g = world_group()
    out: dict[str, bool] = {"applies": direct.applies(g, torch.zeros(4))}
    out["strided_falls_back"] = not direct.applies(g, torch.zeros(4, 4).t())
    for dtype in (torch.float32, torch.bfloat16):
        chunk = 37  # odd sizes: nothing relies on alignment
        # reduce-scatter: rank r's result is its own chunk plus the peers' in the order r+1, r+2, ...
        inputs = [_data(r, (world * chunk,), dtype) for r in range(world)]
        expected = inputs[rank][rank * chunk : (rank + 1) * chunk].clone()
        for k in range(1, world):
            expected += inputs[(rank + k) % world][rank * chunk : (rank + 1) * chunk]
        got = torch.empty(chunk, dtype=dtype)
        comm.reduce_scatter_tensor(got, inputs[rank].clone(), group=g)
        out[f"rs_{dtype}"] = torch.equal(got, expected)
        os.environ["SHARDWISE_GLOO_DIRECT"] = "0"
        ring = torch.empty(chunk, dtype=dtype)
        comm.reduce_scatter_tensor(ring, inputs[rank].clone(), group=g)
        os.environ.pop("SHARDWISE_GLOO_DIRECT")
        # two ranks: a + b either way (bitwise); more: another summation order, so rounding differs (2 bf16 ulps)
        tol = 0.0 if world == 2 else (1e-6 if dtype == torch.float32 else 6e-2)
        out[f"rs_matches_ring_{dtype}"] = torch.allclose(got.float(), ring.float(), rtol=0, atol=tol)
        # in place: the output is this rank's chunk of the input
        buf = inputs[rank].clone()
        comm.reduce_scatter_tensor(buf[rank * chunk : (rank + 1) * chunk], buf, group=g)
        out[f"rs_inplace_{dtype}"] = torch.equal(buf[rank * chunk : (rank + 1) * chunk], expected)
        # all-gather into a 2-d output, and in place (the input is this rank's row of the output)
        rows = torch.empty(world, chunk, dtype=dtype)
        comm.all_gather_into_tensor(rows, _data(rank, (chunk,), dtype), group=g)
        want = torch.stack([_data(r, (chunk,), dtype) for r in range(world)])
        out[f"ag_{dtype}"] = torch.equal(rows, want)
        rows = torch.zeros(world, chunk, dtype=dtype)
        rows[rank] = _data(rank, (chunk,), dtype)
        comm.all_gather_into_tensor(rows, rows[rank], group=g)
        out[f"ag_inplace_{dtype}"] = torch.equal(rows, want)
    # several in flight at once, waited in reverse order: tags keep their messages apart
    handles, results = [], []
    for i in range(5):
        res = torch.empty(world * 8)
        handles.append(comm.all_gather_into_tensor(res, torch.full((8,), float(10 * i + rank)), group=g,
                                                   async_op=True))
        results.append(res)
    rs_out = torch.empty(8)
    handles.append(comm.reduce_scatter_tensor(rs_out, torch.ones(world * 8), group=g, async_op=True))
    for h in reversed(handles):
        h.wait()
    out["async_reverse"] = all(
        torch.equal(res, torch.cat([torch.full((8,), float(10 * i + r)) for r in range(world)]))
        for i, res in enumerate(results)
    ) and torch.equal(rs_out, torch.full((8,), float(world)))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_direct_collectives_match_local_sums_and_gloo(world: int) -> None:
    for result in run_ranks(_collectives, world, world_size=world, timeout=60):
        assert all(result.values()), result


def _logged_bytes() -> dict[str, float]:
    from shardwise import comm
    from shardwise.comm.comms_log import COMMS_LOG

    COMMS_LOG.reset()
    comm.all_gather_into_tensor(torch.empty(2, 1000), torch.zeros(1000))
    comm.reduce_scatter_tensor(torch.empty(1000), torch.zeros(2000))
    return {op: (COMMS_LOG.totals(op).msg_bytes, COMMS_LOG.totals(op).wire_bytes)
            for op in ("all_gather", "reduce_scatter")}


def test_comms_log_counts_the_direct_path_like_the_ring() -> None:
    totals = run_ranks(_logged_bytes)[0]
    assert totals == {"all_gather": (8000, 4000.0), "reduce_scatter": (8000, 4000.0)}, totals


def _gather_timeout() -> str:
    from shardwise import comm
    from shardwise.comm.group import Group

    slow = Group("slow-pair", (0, 1), pg=dist.new_group([0, 1], timeout=timedelta(seconds=1)))
    if dist.get_rank() == 0:
        with pytest.raises(comm.CollectiveError) as info:
            comm.all_gather_into_tensor(torch.empty(2, 4), torch.ones(4), group=slow)
        dist.barrier()
        return str(info.value)
    # rank 1 never joins the slow group's collective; it stays alive (so rank 0 sees a timeout, not a closed
    # peer) until rank 0 is done, which the default group's barrier tells it: no sleep, whatever the machine's load
    dist.barrier()
    return ""


def test_a_direct_all_gather_that_times_out_names_the_operation() -> None:
    message = run_ranks(_gather_timeout, timeout=30)[0]
    assert "rank 0: all_gather #1 on group Group(slow-pair, ranks=[0, 1]) timed out" in message
    assert "Rank 1 did not arrive" in message  # found through the store (comm/arrivals.py)
