"""Stage 0 (data parallel) parity with the single-process float64 reference, and the engine's step semantics."""

from __future__ import annotations

import pytest
import torch

import shardwise
from shardwise import comm
from shardwise.engine.lr_schedules import WarmupLR
from tests.dist import run_ranks
from tests.models import assert_close_rel, mse_loss, rank_batch, reference_train, tiny_mlp

STEPS = 4


def _config(gas: int, dp: int, optimizer: dict, scheduler: dict | None = None, stage: int = 0) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.05,  # small enough that clipping is active on every step
        "optimizer": optimizer,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 2,
    }
    if scheduler:
        cfg["scheduler"] = scheduler
    return cfg


def _train_on_ranks(cfg: dict, gas: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = tiny_mlp(seed=0)
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
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
    assert engine.global_steps == STEPS and engine.micro_steps == STEPS * gas
    return losses, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


OPTIMIZERS = {
    "adam": ({"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.01}},
             lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01)),
    "sgd": ({"type": "SGD", "params": {"lr": 5e-2, "momentum": 0.9}},
            lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9)),
}
SCHEDULER = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 3,
                                            "warmup_type": "linear"}}


def _scheduler_fn(opt):
    return WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=1e-2, warmup_num_steps=3, warmup_type="linear")


@pytest.mark.parametrize("dp", [2, pytest.param(4, marks=pytest.mark.world4)])
@pytest.mark.parametrize("gas", [1, 4])
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_stage0_matches_single_process_reference(dp: int, gas: int, opt: str) -> None:
    opt_cfg, ref_opt = OPTIMIZERS[opt]
    cfg = _config(gas, dp, opt_cfg, SCHEDULER)
    results = run_ranks(_train_on_ranks, cfg, gas, world_size=dp)
    ref_losses, ref_params = reference_train(tiny_mlp(seed=0), STEPS, dp, gas, ref_opt, scheduler_fn=_scheduler_fn,
                                             clip=0.05)
    for rank, (losses, params) in enumerate(results):
        assert_close_rel(losses, ref_losses, what=f"rank {rank} losses")
        for name, value in params.items():
            assert_close_rel(value, ref_params[name], what=f"rank {rank} {name}")
