"""Engine paths that must fail loudly and together: a NaN loss (logged; skipped with ``check_grad_overflow``, checked
against plain PyTorch), ``step()`` inside ``no_sync()`` and unused parameters with ``ignore_unused_parameters: false``
(DeepSpeed raises there; every rank must raise, not one rank while the others wait in a collective: the harness
timeout bounds each test)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import shardwise
from shardwise.engine.engine import EngineUsageError
from shardwise.engine.guards import UnusedParametersError
from tests.dist import run_ranks
from tests.models import assert_state_close, global_batch, mse_loss, rank_batch, tiny_mlp

LR = 1e-2
STEPS = 4
NAN_STEP = 1


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _config(stage: int, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "Adam", "params": {"lr": LR}}, **extra}


def _state(engine) -> dict[str, torch.Tensor]:
    """Weights and every optimizer state tensor of this rank (masters and moments of its partition)."""
    out = {f"param.{k}": v.detach().clone() for k, v in engine.module.state_dict().items()}
    basic = engine.strategy.optimizer.basic
    for i, t in enumerate(p for g in basic.param_groups for p in g["params"]):
        out[f"master.{i}"] = t.detach().clone()
        for key, value in basic.state.get(t, {}).items():
            out[f"state.{i}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def _nan_run(config: dict) -> dict:
    """Train STEPS steps; at NAN_STEP only rank 1's loss is NaN. Returns states around that step and the log."""
    capture = _Capture()
    logging.getLogger("shardwise").addHandler(capture)
    engine, *_ = shardwise.initialize(model=tiny_mlp(seed=0), config=config)
    rank = engine.global_rank
    dtype = next(engine.module.parameters()).dtype
    before = after = None
    for step in range(STEPS):
        x, y = rank_batch(step, rank)
        loss = mse_loss(engine, x.to(dtype), y.to(dtype)).float()
        if step == NAN_STEP and rank == 1:
            loss = loss * float("nan")
        engine.backward(loss)
        if step == NAN_STEP:
            before = _state(engine)
        engine.step()
        if step == NAN_STEP:
            after = _state(engine)
    logging.getLogger("shardwise").removeHandler(capture)
    return {"before": before, "after": after, "final": {k: v.detach().clone()
                                                         for k, v in engine.module.state_dict().items()},
            "skipped": engine.skipped_steps, "log": capture.lines}


def _torch_reference(skip: int) -> dict[str, torch.Tensor]:
    """Plain single-process fp32 PyTorch on the global batches, leaving out step ``skip``."""
    model = tiny_mlp(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(STEPS):
        if step == skip:
            continue
        batches = global_batch(step, 2, 1)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        mse_loss(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 2])
def test_fp32_check_grad_overflow_skips_the_nan_step_like_torch_without_it(stage: int) -> None:
    results = run_ranks(_nan_run, _config(stage, check_grad_overflow=True))
    reference = _torch_reference(skip=NAN_STEP)
    for rank, r in enumerate(results):
        assert r["skipped"] == 1
        for key, value in r["before"].items():  # the skipped step changed nothing, bit for bit
            assert torch.equal(value, r["after"][key]), f"rank {rank}: {key} changed in the skipped step"
        assert_state_close(r["final"], reference, rtol=1e-5, what=f"rank {rank}")
    assert any("rank 1" in line and "loss is nan" in line for line in results[1]["log"])
    assert all(any(f"step {NAN_STEP + 1}: the global gradient norm is nan" in line and "skipped" in line
                   for line in r["log"]) for r in results)


def test_fp32_default_applies_the_nan_update_as_deepspeed_and_says_so_once() -> None:
    results = run_ranks(_nan_run, _config(1))
    for r in results:
        assert r["skipped"] == 0 and not all(torch.isfinite(v).all() for v in r["final"].values())
        norm_lines = [line for line in r["log"] if "global gradient norm is nan" in line]
        assert len(norm_lines) == 1 and "weights become NaN" in norm_lines[0] and "check_grad_overflow" in norm_lines[0]


def test_bf16_follows_the_top_level_key_when_bf16_block_leaves_it_unset() -> None:
    results = run_ranks(_nan_run, _config(1, bf16={"enabled": True}, check_grad_overflow=False))
    assert all(r["skipped"] == 0 for r in results)
    results = run_ranks(_nan_run, _config(1, bf16={"enabled": True}))  # bf16.check_grad_overflow defaults to true
    for r in results:
        assert r["skipped"] == 1 and all(torch.isfinite(v.float()).all() for v in r["final"].values())


# -- step() inside no_sync() ---------------------------------------------------------------------------------------
def _step_inside_no_sync(precision: str, stage: int) -> list[str]:
    extra = {precision: {"enabled": True}} if precision != "fp32" else {}
    engine, *_ = shardwise.initialize(model=tiny_mlp(seed=0), config=_config(stage, **extra))
    dtype = next(engine.module.parameters()).dtype
    x, y = rank_batch(0, engine.global_rank)
    out = []
    with engine.no_sync():
        engine.backward(mse_loss(engine, x.to(dtype), y.to(dtype)).float())
        try:
            engine.step()
            out.append("stepped")
        except AssertionError as exc:  # DeepSpeed raises AssertionError; ours is an EngineUsageError too
            assert isinstance(exc, EngineUsageError)
            out.append(str(exc))
    engine.backward(mse_loss(engine, x.to(dtype), y.to(dtype)).float())
    engine.step()  # outside the context the engine steps normally, on every rank together
    out.append(f"steps={engine.global_steps}")
    return out


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("stage", [0, 1])
def test_step_inside_no_sync_raises_on_every_rank(precision: str, stage: int) -> None:
    r0, r1 = run_ranks(_step_inside_no_sync, precision, stage, timeout=60)
    assert r0 == r1
    assert "It is illegal to call Engine.step() inside no_sync context manager" in r0[0] and r0[1] == "steps=1"


# -- unused parameters with ignore_unused_parameters: false ----------------------------------------------------
class _Branchy(nn.Module):
    """``extra`` is used only when ``use_extra``; ``unused`` never."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.extra, self.unused = nn.Linear(8, 4), nn.Linear(4, 4), nn.Linear(8, 4)
        self.use_extra = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.extra(h) if self.use_extra else h


def _unused_run(ignore: bool, only_rank1: bool) -> str:
    config = _config(2, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"},
                                           "ignore_unused_parameters": ignore})
    model = _Branchy()
    if only_rank1:
        model.unused = nn.Identity()  # every parameter is used, except 'extra' on rank 1 below
    engine, *_ = shardwise.initialize(model=model, config=config)
    model.use_extra = not (only_rank1 and engine.global_rank == 1)
    x, y = rank_batch(0, engine.global_rank)
    engine.backward(mse_loss(engine, x, y))
    try:
        engine.step()
    except UnusedParametersError as exc:
        assert isinstance(exc, AssertionError)
        return str(exc)
    return f"stepped {engine.global_steps}"


def test_unused_parameters_raise_on_every_rank_when_not_ignored() -> None:
    r0, r1 = run_ranks(_unused_run, False, False, timeout=60)
    assert r0 == r1 and "ignore_unused_parameters is false" in r0 and "unused.weight" in r0 and "Fix:" in r0
    r0, r1 = run_ranks(_unused_run, False, True, timeout=60)  # only rank 1 misses a gradient: both raise
    assert r0 == r1 and "rank 1: extra.bias, extra.weight" in r0 and "rank 0" not in r0
    assert run_ranks(_unused_run, True, False, timeout=60) == ["stepped 1", "stepped 1"]  # the default
