"""Exact resume: 10 steps uninterrupted == 5 steps, save, a fresh process group, load, 5 steps (bitwise).

Covered: ZeRO stages 0, 1, 2, 3; fp32, bf16 (BF16 optimizer and ZeRO-2), fp16 with a dynamic loss scale that changes
during the run; an LR schedule; gradient accumulation; optimizer offload (CPU Adam, integer step counter); SGD with
momentum; dropout (the RNG states must be restored for the masks to match). The model is the tiny GPT (tied
embeddings), so tied weights are exercised everywhere.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import shardwise
from tests.dist import run_ranks
from tests.models import TINY_GPT, rank_batch, tiny_transformer

STEPS, SAVE_AT = 10, 5


def _config(stage: int, precision: str = "fp32", gas: int = 1, **extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000},
    }
    if precision != "fp32":
        cfg[precision] = {"enabled": True}
    cfg.update(extra)
    return cfg


def _train(cfg: dict, dropout: float, load_dir: str | None, save_dir: str | None, stop: int) -> dict:
    torch.manual_seed(1)
    model = tiny_transformer(seed=0, cfg=dataclasses.replace(TINY_GPT, dropout=dropout))
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
    if load_dir is not None:
        path, client = engine.load_checkpoint(load_dir)
        assert path is not None and client == {"step": SAVE_AT, "note": ("resume", 1)}
    rank, gas = engine.topology.coord("dp"), engine.gradient_accumulation_steps()
    losses = []
    for step in range(engine.global_steps, stop):
        for micro in range(gas):
            x, y = rank_batch(step, rank, micro, kind="gpt", batch=2)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        if save_dir is not None and engine.global_steps == SAVE_AT:
            engine.save_checkpoint(save_dir, client_state={"step": SAVE_AT, "note": ("resume", 1)})
    return {"losses": losses, "scale": engine.get_loss_scale(), "lr": engine.get_lr(),
            "counters": (engine.global_steps, engine.global_samples, engine.micro_steps, engine.skipped_steps),
            "params": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}


def _second_run(cfg: dict, dropout: float, load_dir: str) -> dict:
    return _train(cfg, dropout, load_dir, None, STEPS)


CASES = {
    "stage0-fp32": (_config(0), 0.0),
    "stage2-fp32-dropout": (_config(2), 0.1),
    "stage1-bf16": (_config(1, "bf16"), 0.0),
    "stage2-bf16": (_config(2, "bf16"), 0.0),
    "stage0-fp16-scaler": (_config(0, "fp16", fp16={"enabled": True, "initial_scale_power": 10,
                                                      "loss_scale_window": 2}), 0.0),
    "stage2-fp16-scaler": (_config(2, "fp16", fp16={"enabled": True, "initial_scale_power": 10,
                                                      "loss_scale_window": 2}), 0.0),
    "stage1-accumulation": (_config(1, gas=2), 0.1),
    "stage2-offload-scheduler": (_config(2, zero_optimization={"stage": 2, "reduce_bucket_size": 3000,
                                                               "offload_optimizer": {"device": "cpu"}},
                                         scheduler={"type": "WarmupDecayLR", "params": {
                                             "total_num_steps": STEPS, "warmup_num_steps": 3,
                                             "warmup_max_lr": 5e-3}}), 0.0),
    "stage3-fp32-sharded": (_config(3, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0}),
                            0.1),
    "stage3-bf16": (_config(3, "bf16"), 0.0),
    "stage1-sgd-momentum": (_config(1, optimizer={"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}}), 0.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bitwise_exact(case: str, tmp_path) -> None:
    cfg, dropout = CASES[case]
    # the uninterrupted run saves at step 5 on the way (a save must not disturb training either)
    first = run_ranks(_train, cfg, dropout, None, str(tmp_path), STEPS)
    second = run_ranks(_second_run, cfg, dropout, str(tmp_path))
    for rank, (full, resumed) in enumerate(zip(first, second)):
        gas = cfg["gradient_accumulation_steps"]
        assert resumed["losses"] == full["losses"][SAVE_AT * gas :], f"rank {rank}: losses after resume differ"
        assert resumed["counters"] == full["counters"]
        assert resumed["scale"] == full["scale"] and resumed["lr"] == full["lr"]
        for name, value in full["params"].items():
            assert torch.equal(resumed["params"][name], value), f"rank {rank}: {name} differs after resume"
    if "scaler" in case:
        assert first[0]["scale"] != 2.0**10, "the loss scale never changed: the scaler state was not exercised"
