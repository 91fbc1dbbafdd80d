"""Plain ``loss.backward()`` trains exactly like ``engine.backward(loss)`` on ZeRO stages 0-3 (DeepSpeed 0.18.3+'s
PyTorch-style backward): gradient accumulation boundary, ZeRO reduction, ``engine.scale(loss).backward()`` under fp16;
and the modes that cannot work raise instead of silently training differently.

Tolerances: loss.backward() vs engine.backward(loss) bitwise equal (gradient accumulation 2 is a power of two, so
dividing the output gradients by it is exact); both against the float64 single-process reference at the suite's
fp32 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

import shardwise
from shardwise import comm
from shardwise.engine.backward_hooks import BackwardScaleError
from shardwise.zero import GatheredParameters
from shardwise.zero.hooks import BackwardOutsideEngineError
from tests.dist import run_ranks
from tests.models import assert_close_rel, rank_batch, reference_train, tiny_mlp

STEPS = 3
GAS = 2
CLIP = 0.05


def _cfg(stage: int, **extra: dict) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": GAS,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 200},
    }
    cfg.update(extra)
    return cfg


def _train(cfg: dict, mode: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    rank = engine.topology.coord("dp")
    losses = []
    for step in range(STEPS):
        total = torch.zeros(())
        for micro in range(GAS):
            x, y = rank_batch(step, rank, micro)
            out = engine(x)
            y = y.to(out.dtype)
            if mode == "nonscalar":  # output.backward(grad): the gradient of mse_loss, passed by hand
                loss = torch.nn.functional.mse_loss(out, y)
                out.backward(2 * (out.detach() - y) / out.numel())
            else:
                loss = torch.nn.functional.mse_loss(out, y)
                if mode == "engine":
                    engine.backward(loss)
                elif mode == "scale":
                    engine.scale(loss).backward()
                else:
                    loss.backward()
            engine.step()
            total += loss.detach().float()
        comm.all_reduce(total)
        losses.append(total.item() / (GAS * engine.dp_world_size))
    with GatheredParameters(list(engine.module.parameters())):  # ZeRO-3: whole weights; otherwise a no-op
        params = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    return losses, params


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_plain_backward_matches_engine_backward_and_reference(stage: int) -> None:
    plain = run_ranks(_train, _cfg(stage), "plain")
    engine = run_ranks(_train, _cfg(stage), "engine")
    ref_losses, ref_params = reference_train(tiny_mlp(seed=0), STEPS, 2, GAS,
                                             lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01), clip=CLIP)
    for rank in range(2):
        assert plain[rank][0] == engine[rank][0], f"rank {rank}: losses differ"
        for name, value in plain[rank][1].items():
            assert torch.equal(value, engine[rank][1][name]), f"rank {rank} {name}"
        assert_close_rel(plain[rank][0], ref_losses, what=f"rank {rank} losses")
        for name, value in plain[rank][1].items():
            assert_close_rel(value, ref_params[name], what=f"rank {rank} {name}")


@pytest.mark.parametrize("stage", [2, 3])
def test_nonscalar_backward_with_a_gradient_matches(stage: int) -> None:
    got = run_ranks(_train, _cfg(stage), "nonscalar")
    want = run_ranks(_train, _cfg(stage), "engine")
    for rank in range(2):
        assert_close_rel(got[rank][0], want[rank][0], what=f"rank {rank} losses")
        for name, value in got[rank][1].items():
            assert_close_rel(value, want[rank][1][name], what=f"rank {rank} {name}")


def _fp16_cfg(stage: int) -> dict:
    return _cfg(stage, fp16={"enabled": True, "initial_scale_power": 8, "auto_cast": True})


@pytest.mark.parametrize("stage", [1, 3])
def test_fp16_scale_then_backward_matches_engine_backward(stage: int) -> None:
    scaled = run_ranks(_train, _fp16_cfg(stage), "scale")
    engine = run_ranks(_train, _fp16_cfg(stage), "engine")
    for rank in range(2):
        assert scaled[rank][0] == engine[rank][0], f"rank {rank}: losses differ"
        for name, value in scaled[rank][1].items():
            assert torch.equal(value, engine[rank][1][name]), f"rank {rank} {name}"


def _plain_fp16(stage: int) -> str:
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=_fp16_cfg(stage))
    x, y = rank_batch(0, engine.topology.coord("dp"))
    loss = torch.nn.functional.mse_loss(engine(x), y.half())
    with pytest.raises(BackwardScaleError) as info:
        loss.backward()
    return str(info.value)


def test_fp16_plain_backward_raises_naming_the_fix() -> None:
    message = run_ranks(_plain_fp16, 2)[0]
    assert "engine.scale(loss).backward()" in message and "engine.backward(loss)" in message


def _bypass(stage: int) -> str:
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=_cfg(stage))
    x, y = rank_batch(0, engine.topology.coord("dp"))
    loss = torch.nn.functional.mse_loss(engine.module(x), y)  # ZeRO-3: the module's own hooks still gather
    with pytest.raises(BackwardOutsideEngineError) as info:
        loss.backward()
    return str(info.value)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_loss_not_from_the_engine_forward_raises(stage: int) -> None:
    assert "engine(...)" in run_ranks(_bypass, stage)[0]


def _after_failed_backward(stage: int, fail: bool) -> dict[str, torch.Tensor]:
    """A plain backward that raises midway leaves no stale state: the next window trains as on a fresh engine."""
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=_cfg(stage))
    rank = engine.topology.coord("dp")

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom")

    if fail:  # the failure is inside the model, after the pass was armed (its epilogue never runs)
        handle = engine.module[2].register_forward_hook(lambda _m, _i, out: Boom.apply(out))
        x, y = rank_batch(0, rank)
        with pytest.raises(RuntimeError, match="boom"):
            torch.nn.functional.mse_loss(engine(x), y).backward()
        handle.remove()
        assert engine._plain_backward.hooked_pass  # the stale state the next forward must clear
        engine.zero_grad()
    for micro in range(GAS):
        x, y = rank_batch(1, rank, micro)
        torch.nn.functional.mse_loss(engine(x), y).backward()
        engine.step()
    with GatheredParameters(list(engine.module.parameters())):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_failed_plain_backward_leaves_no_stale_state(stage: int) -> None:
    failed, clean = run_ranks(_after_failed_backward, stage, True), run_ranks(_after_failed_backward, stage, False)
    for rank in range(2):
        for name, value in failed[rank].items():
            assert torch.equal(value, clean[rank][name]), f"rank {rank} {name}"
