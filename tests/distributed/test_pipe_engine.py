"""Pipeline engine behaviour beyond parity: the BF16 optimizer, data from initialize(), logits, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import shardwise
from shardwise.pipe import PipeDataParallelTopology, PipelineError, PipelineModule
from tests.dist import run_ranks
from tests.models import rank_batch, reference_train
from tests.pipe_models import BASE_SEED, mse_loss_fn, pair_mlp_specs, reference_module


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), y)


def _model(stages: int = 2) -> PipelineModule:
    return PipelineModule(pair_mlp_specs(1), num_stages=stages, loss_fn=_mse, seed_layers=True,
                          base_seed=BASE_SEED, partition_method="uniform")


def _config(**extra: object) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, **extra}


def _refusals() -> list[str]:
    messages = []
    with pytest.raises(PipelineError) as info:
        shardwise.initialize(model=_model(), config=_config(zero_optimization={"stage": 2}))
    messages.append(str(info.value))
    chunked = PipelineModule(pair_mlp_specs(2), num_stages=2, loss_fn=_mse, partition_method="uniform",
                             virtual_stages=2)
    with pytest.raises(PipelineError) as info:
        shardwise.initialize(model=chunked, config=_config(gradient_accumulation_steps=3))
    messages.append(str(info.value))
    return messages


def test_zero2_and_bad_interleaving_are_refused() -> None:
    for zero, chunks in run_ranks(_refusals):
        assert "stage 2 is incompatible with pipeline parallelism" in zero and "Use stage 1" in zero
        assert "needs gradient_accumulation_steps (3) to be a multiple" in chunks


def _bf16() -> dict:
    engine, _, _, _ = shardwise.initialize(model=_model(), config=_config(
        bf16={"enabled": True}, zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"},
        gradient_clipping=1.0))
    losses = [engine.train_batch(iter([rank_batch(s, 0, m) for m in range(2)])).item() for s in range(4)]
    tied = engine.module.tied_modules["mid"].weight.detach().float().clone()
    return {"losses": losses, "tied": tied, "strategy": engine.strategy.describe(),
            "dtype": str(next(engine.module.parameters()).dtype)}


def test_bf16_optimizer_trains_a_pipeline() -> None:
    results = run_ranks(_bf16)
    ref, _ = reference_train(reference_module(pair_mlp_specs(1)), 4, 1, 2,
                             lambda p: torch.optim.AdamW(p, lr=1e-2), loss_fn=mse_loss_fn, clip=1.0)
    for r in results:
        assert "BF16 optimizer" in r["strategy"] and r["dtype"] == "torch.bfloat16"
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref), rtol=3e-2, atol=0)
    assert torch.equal(results[0]["tied"], results[1]["tied"])


def _data_and_logits() -> dict:
    x = torch.cat([rank_batch(0, 0, m)[0] for m in range(4)])
    y = torch.cat([rank_batch(0, 0, m)[1] for m in range(4)])
    model = PipelineModule(pair_mlp_specs(1), topology=PipeDataParallelTopology(num_pp=2, num_dp=1), loss_fn=_mse,
                           seed_layers=True, base_seed=BASE_SEED, partition_method="uniform")  # DeepSpeed's class
    engine, _, loader, _ = shardwise.initialize(model=model, config=_config(), training_data=TensorDataset(x, y))
    grid = model.mpu()
    assert engine.topology is model.topology() and grid.get_pipe_parallel_world_size() == 2
    assert grid.get_stage_id() == engine.stage_id and model._topo.get_dim("pipe") == 2
    first = engine.train_batch().item()  # reads 2 micro-batches from the loader initialize() built
    loss, logits = engine.eval_batch(iter([(x[:4], y[:4]), (x[4:8], y[4:8])]), return_logits=True)
    with pytest.raises(PipelineError, match="train_batch"):
        engine(x[:4])
    with pytest.raises(PipelineError, match="train_batch"):
        engine.step()
    return {"first": first, "loss": float(loss), "logits": None if logits is None else tuple(logits.shape),
            "loader": loader is not None}


def test_training_data_from_initialize_and_eval_logits() -> None:
    results = run_ranks(_data_and_logits)
    assert results[0]["first"] == results[1]["first"] > 0
    assert results[0]["loss"] == results[1]["loss"]
    assert results[0]["logits"] is None and results[1]["logits"] == (4, 4)  # last micro-batch, last stage only
    assert all(r["loader"] for r in results)


def _fp16() -> dict:
    engine, _, _, _ = shardwise.initialize(model=_model(), config=_config(
        fp16={"enabled": True, "initial_scale_power": 8}, gradient_clipping=1.0))
    losses = [engine.train_batch(iter([rank_batch(s, 0, m) for m in range(2)])).item() for s in range(4)]
    return {"losses": losses, "scale": engine.get_loss_scale(), "norm": engine.get_global_grad_norm()}


def test_fp16_loss_scaling_agrees_across_stages() -> None:
    results = run_ranks(_fp16)
    ref, _ = reference_train(reference_module(pair_mlp_specs(1)), 4, 1, 2,
                             lambda p: torch.optim.AdamW(p, lr=1e-2), loss_fn=mse_loss_fn, clip=1.0)
    assert results[0] == results[1]  # same loss, loss scale and global norm on every stage
    torch.testing.assert_close(torch.tensor(results[0]["losses"]), torch.tensor(ref), rtol=1e-2, atol=0)
