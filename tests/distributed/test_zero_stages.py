"""ZeRO-1 and ZeRO-2 parity with the single-process float64 reference (fp32), across layouts and options."""

from __future__ import annotations

import pytest
import torch

import shardwise
from shardwise import comm
from tests.dist import run_ranks
from tests.models import assert_close_rel, mse_loss, rank_batch, reference_train, tiny_mlp

STEPS = 4
CLIP = 0.05


def _train(cfg: dict, gas: int) -> tuple[list[float], dict[str, torch.Tensor], dict[str, int]]:
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    dp, rank = engine.dp_world_size, engine.topology.coord("dp")
    losses = []
    for step in range(STEPS):
        total = torch.zeros(())
        for micro in range(gas):
            x, y = rank_batch(step, rank, micro)
            loss = mse_loss(engine, x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        comm.all_reduce(total)
        losses.append(total.item() / (gas * dp))
    params = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return losses, params, engine.memory_breakdown()


def _cfg(stage: int, gas: int, **zero) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        # 200-element buckets: the tiny MLP spans several, so bucketing, overlap and partition offsets are exercised
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 200, **zero},
    }


def _check(results: list, dp: int, gas: int) -> None:
    ref_losses, ref_params = reference_train(tiny_mlp(seed=0), STEPS, dp, gas,
                                             lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01), clip=CLIP)
    for rank, (losses, params, _) in enumerate(results):
        assert_close_rel(losses, ref_losses, what=f"rank {rank} losses")
        for name, value in params.items():
            assert_close_rel(value, ref_params[name], what=f"rank {rank} {name}")


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("dp", [2, pytest.param(4, marks=pytest.mark.world4)])
@pytest.mark.parametrize("gas", [1, 4])
@pytest.mark.parametrize("offload", [False, True], ids=["device", "offload"])
def test_zero_matches_reference(stage: int, dp: int, gas: int, offload: bool) -> None:
    zero = {"offload_optimizer": {"device": "cpu"}} if offload else {}
    results = run_ranks(_train, _cfg(stage, gas, **zero), gas, world_size=dp)
    _check(results, dp, gas)


@pytest.mark.parametrize("option", [{"overlap_comm": False}, {"reduce_scatter": False},
                                    {"contiguous_gradients": False, "round_robin_gradients": True}],
                         ids=["no-overlap", "allreduce", "rr"])
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_options_keep_parity(stage: int, option: dict) -> None:
    results = run_ranks(_train, _cfg(stage, 2, **option), 2, world_size=2)
    _check(results, 2, 2)


def _comm_dtype_run(stage: int, comm_dtype: str | None) -> dict:
    from shardwise.comm import COMMS_LOG

    cfg = _cfg(stage, 1)
    if comm_dtype:
        cfg["communication_data_type"] = comm_dtype
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    losses, reduced = [], 0
    for step in range(STEPS):
        COMMS_LOG.reset()
        x, y = rank_batch(step, engine.topology.coord("dp"))
        loss = mse_loss(engine, x, y)
        engine.backward(loss)
        engine.step()
        # gradient reductions only (the global-norm all-reduce is a float64 scalar in every run)
        grad_op = "all_reduce" if stage == 0 else "reduce_scatter"
        reduced += sum(s.msg_bytes for (op, _), s in COMMS_LOG.stats.items() if op == grad_op)
        losses.append(loss.item())
    return {"losses": losses, "reduced_bytes": reduced}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_communication_data_type_halves_gradient_bytes(stage: int) -> None:
    exact = run_ranks(_comm_dtype_run, stage, None)[0]
    half = run_ranks(_comm_dtype_run, stage, "bf16")[0]
    assert half["reduced_bytes"] * 2 == exact["reduced_bytes"]
    drift = max(abs(a - b) / abs(b) for a, b in zip(half["losses"], exact["losses"]))
    assert drift < 1e-2, drift  # bf16 rounding of the reduced gradients only
