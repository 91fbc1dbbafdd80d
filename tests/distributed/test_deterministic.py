"""Deterministic mode (``"deterministic": true``): two identical 2-rank runs give bitwise-identical losses and
parameters on ZeRO stages 0-3 (bf16, gradient accumulation 2, overlapped bucketed reductions), the pipeline and
tensor parallelism; and the mode really switches torch to deterministic algorithms (off by default)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardwise
from shardwise import comm
from shardwise.pipe import PipelineModule
from shardwise.zero import GatheredParameters
from tests.dist import run_ranks
from tests.distributed.llama_helpers import TINY, ds_config, train_parallel
from tests.models import rank_batch, tiny_transformer
from tests.pipe_models import BASE_SEED, pair_mlp_specs

STEPS = 4


def _zero(stage: int, deterministic: bool = True) -> dict:
    engine, _, _, _ = shardwise.initialize(model=tiny_transformer(seed=0), config={
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-3}}, "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 4000},
        **({"deterministic": True} if deterministic else {})})
    rank = engine.topology.coord("dp")
    losses = []
    for step in range(STEPS):
        for micro in range(2):
            x, y = rank_batch(step, rank, micro, kind="gpt")
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total = loss.detach().float().clone()
            comm.all_reduce(total)
            losses.append(total.item())
    with GatheredParameters(list(engine.module.parameters())):
        params = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return {"losses": losses, "params": params, "deterministic": torch.are_deterministic_algorithms_enabled()}


def _pipe() -> dict:
    model = PipelineModule(pair_mlp_specs(2), num_stages=2, loss_fn=F.mse_loss, seed_layers=True,
                           base_seed=BASE_SEED, partition_method="uniform")
    engine, _, _, _ = shardwise.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "deterministic": True})
    losses = [engine.train_batch(iter([rank_batch(s, 0, m) for m in range(4)])).item() for s in range(STEPS)]
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def _tp() -> dict:
    losses, params = train_parallel(TINY, ds_config(1, 1, deterministic=True), tp=2)
    return {"losses": losses, "params": params, "deterministic": torch.are_deterministic_algorithms_enabled()}


def _same(first: list[dict], second: list[dict]) -> None:
    for rank, (a, b) in enumerate(zip(first, second)):
        assert a["deterministic"] and b["deterministic"]
        assert a["losses"] == b["losses"], f"rank {rank}: losses differ"
        assert a["params"].keys() == b["params"].keys()
        for name, value in a["params"].items():
            assert torch.equal(value, b["params"][name]), f"rank {rank} {name}"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_runs_are_bitwise_identical_zero(stage: int) -> None:
    _same(run_ranks(_zero, stage), run_ranks(_zero, stage))


def test_two_runs_are_bitwise_identical_pipeline() -> None:
    _same(run_ranks(_pipe), run_ranks(_pipe))


def test_two_runs_are_bitwise_identical_tensor_parallel() -> None:
    _same(run_ranks(_tp), run_ranks(_tp))


def test_off_by_default() -> None:
    assert not any(r["deterministic"] for r in run_ranks(_zero, 1, False))
