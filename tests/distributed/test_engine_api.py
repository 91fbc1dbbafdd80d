"""The engine's DeepSpeed API surface beyond parity: accessors, accumulation boundary, no_sync, the data loader,
the step log, idempotent init_distributed, and collective timeouts that name the operation, group and rank."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

import shardwise
from shardwise import comm
from shardwise.comm.group import Group
from tests.dist import run_ranks
from tests.models import mse_loss, rank_batch, tiny_mlp


def _cfg(**extra) -> dict:
    return {"train_batch_size": 16, "gradient_accumulation_steps": 2, "steps_per_print": 1,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, **extra}


def _accessors() -> dict:
    shardwise.init_distributed()  # idempotent: the harness already started torch.distributed
    shardwise.init_distributed()
    engine, opt, loader, sched = shardwise.initialize(model=tiny_mlp(), config=_cfg(bf16={"enabled": False}))
    out = {
        "tbs": engine.train_batch_size(), "micro": engine.train_micro_batch_size_per_gpu(),
        "gas": engine.gradient_accumulation_steps(), "stage": engine.zero_optimization_stage(),
        "bf16": engine.bfloat16_enabled(), "fp16": engine.fp16_enabled(), "clip": engine.gradient_clipping(),
        "dp": engine.dp_world_size, "local_rank": engine.local_rank, "device": str(engine.device),
        "lr": engine.get_lr(), "loader": loader, "sched": sched, "same_opt": opt is engine.optimizer,
        "boundaries": [],
    }
    for micro in range(4):
        out["boundaries"].append(engine.is_gradient_accumulation_boundary())
        x, y = rank_batch(0, engine.global_rank, micro)
        engine.backward(mse_loss(engine, x, y))
        engine.step()
    out["global_steps"], out["global_samples"] = engine.global_steps, engine.global_samples
    out["norm"] = engine.get_global_grad_norm()
    return out


def test_accessors_and_accumulation_boundary() -> None:
    r = run_ranks(_accessors)[0]
    assert (r["tbs"], r["micro"], r["gas"], r["stage"], r["dp"]) == (16, 4, 2, 0, 2)
    assert (r["bf16"], r["fp16"], r["clip"], r["device"]) == (False, False, 1.0, "cpu")  # 0.19 default clip 1.0
    assert r["lr"] == [0.1] and r["loader"] is None and r["sched"] is None and r["same_opt"]
    assert r["boundaries"] == [False, True, False, True]
    assert (r["global_steps"], r["global_samples"]) == (2, 32)
    assert r["norm"] is not None and r["norm"] > 0


def _no_sync_and_forced_boundary(stage: int) -> dict:
    engine, *_ = shardwise.initialize(model=tiny_mlp(), config=_cfg(zero_optimization={"stage": stage}))
    first = engine.module[0].weight
    before = first.detach().clone()
    with engine.no_sync():
        x, y = rank_batch(0, engine.global_rank)
        engine.backward(mse_loss(engine, x, y))
    local = first.grad.detach().clone() if first.grad is not None else None
    engine.set_gradient_accumulation_boundary(True)
    x, y = rank_batch(1, engine.global_rank)
    engine.backward(mse_loss(engine, x, y))
    engine.step()
    engine.set_gradient_accumulation_boundary(None)
    return {"changed": not torch.equal(before, first.detach()), "steps": engine.global_steps, "local": local}


def test_no_sync_accumulates_locally_and_a_forced_boundary_steps() -> None:
    r0, r1 = run_ranks(_no_sync_and_forced_boundary, 0)
    assert r0["changed"] and r0["steps"] == 1
    assert not torch.equal(r0["local"], r1["local"])  # not reduced inside no_sync


def _no_sync_stage2() -> str:
    engine, *_ = shardwise.initialize(model=tiny_mlp(), config=_cfg(zero_optimization={"stage": 2}))
    with pytest.raises(RuntimeError, match=r"no_sync\(\) is not compatible with ZeRO stage 2"):
        with engine.no_sync():
            pass
    return "ok"


def test_no_sync_is_refused_with_zero2() -> None:
    assert run_ranks(_no_sync_stage2) == ["ok", "ok"]


def _loader_and_step_log(caplog_level: int) -> dict:
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("shardwise").addHandler(Capture())
    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 4))
    engine, _, loader, _ = shardwise.initialize(model=tiny_mlp(), config=_cfg(), training_data=data)
    seen = []
    for i, (x, y) in enumerate(loader):
        seen.append(x.shape[0])
        engine.backward(mse_loss(engine, x, y))
        engine.step()
        if i == 3:
            break
    return {"batches": seen, "len": len(loader), "log": [m for m in records if m.startswith("step ")]}


def test_training_data_gives_each_rank_its_shard_and_the_step_log_prints() -> None:
    r0, r1 = run_ranks(_loader_and_step_log, logging.INFO)
    assert r0["batches"] == [4, 4, 4, 4] and r0["len"] == 8  # 64 samples / 2 ranks / micro 4
    assert len(r0["log"]) == 2 and not r1["log"]  # steps_per_print 1, two optimizer steps, rank 0 only
    line = r0["log"][0]
    for field in ("step 1", "loss", "lr 1.000e-01", "samples/s", "ms/step", "peak mem/rank"):
        assert field in line, line


def _timeout() -> str:
    slow = dist.new_group([0, 1], timeout=timedelta(seconds=1))
    group = Group("slow-pair", (0, 1), pg=slow)
    if dist.get_rank() == 0:
        with pytest.raises(comm.CollectiveError) as info:
            comm.all_reduce(torch.ones(4), group=group)
        dist.barrier()
        return str(info.value)
    # rank 1 never joins the slow group's collective; it stays alive (so rank 0 sees a timeout, not a closed
    # peer) until rank 0 is done, which the default group's barrier tells it: no sleep, whatever the machine's load
    dist.barrier()
    return ""


def test_a_collective_that_times_out_names_the_operation_group_and_rank() -> None:
    message = run_ranks(_timeout, timeout=30)[0]
    assert "rank 0: all_reduce #1 on group Group(slow-pair, ranks=[0, 1]) timed out" in message
    assert "same collectives in the same order" in message


class _DtypeProbe(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return self.lin(x)


def _auto_cast(auto_cast: bool) -> list[str]:
    cfg = _cfg(fp16={"enabled": True, "auto_cast": auto_cast})
    engine, *_ = shardwise.initialize(model=_DtypeProbe(), config=cfg)
    out = engine(torch.randn(4, 8).half() if not auto_cast else torch.randn(4, 8))
    assert out.dtype == torch.float16
    return [str(d) for d in engine.module.seen]


def test_fp16_auto_cast_casts_floating_inputs() -> None:
    assert run_ranks(_auto_cast, True)[0] == ["torch.float16"]
    assert run_ranks(_auto_cast, False)[0] == ["torch.float16"]
