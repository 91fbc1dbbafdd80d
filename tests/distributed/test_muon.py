"""``"optimizer": {"type": "Muon"}`` on 2 ranks at ZeRO 0-3 against single-process training with the same
Muon/AdamW split (float64 reference, fp32 engine, 1e-5), with every weight split across the ranks' partitions."""

from __future__ import annotations

import pytest
import torch

import shardwise
from shardwise import comm
from shardwise.ops.muon import MuonWithAuxAdam, full_shape, split_params
from shardwise.zero import GatheredParameters
from tests.dist import run_ranks
from tests.models import assert_close_rel, global_batch, mse_loss, rank_batch, tiny_mlp

STEPS = 4
CLIP = 0.5
MUON = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.01, "adam_lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8}


def _config(stage: int, gas: int, **params) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": 200}  # 200-element buckets: every weight is split across ranks
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_module_granularity_threshold=0)
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": CLIP,
            "optimizer": {"type": "Muon", "params": {**MUON, **params}}, "zero_optimization": zero}


def _train(cfg: dict, gas: int, chunk: int | None = None) -> dict:
    if chunk is not None:  # gather the weights a few at a time (several collectives per step)
        from shardwise.ops import muon_partition

        muon_partition.CHUNK_NUMEL = chunk
    engine, optimizer, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    basic = engine.strategy.optimizer.basic
    dp, rank = engine.dp_world_size, engine.topology.coord("dp")
    losses = []
    for step in range(STEPS):
        total = torch.zeros(())
        for micro in range(gas):
            loss = mse_loss(engine, *rank_batch(step, rank, micro))
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        comm.all_reduce(total)
        losses.append(total.item() / (gas * dp))
    with GatheredParameters(list(engine.module.parameters())):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    pieces = [[(f.start, f.end) for f in engine.strategy.fragments(p)] for p in basic._members[0]]
    return {"losses": losses, "state": state, "muon_sizes": [full_shape(p).numel() for p in basic._members[0]],
            "pieces": pieces, "is_muon": isinstance(basic, MuonWithAuxAdam)}


def _reference(gas: int, dp: int, **params) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain single-process float64 training: the same split, global batches, clipping, then ``step()``."""
    model = tiny_mlp(seed=0).double()
    opt = MuonWithAuxAdam(split_params(model.named_parameters(), {**MUON, **params}))
    losses = []
    for step in range(STEPS):
        batches = global_batch(step, dp, gas)
        x = torch.cat([b[0] for b in batches]).double()
        y = torch.cat([b[1] for b in batches]).double()
        loss = mse_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("stage", "gas", "params", "chunk"), [
    (0, 1, {}, None), (1, 2, {}, None), (2, 2, {}, None), (2, 1, {"ns_method": "standard", "nesterov": False}, 300),
    (3, 2, {}, None),
], ids=["zero0", "zero1-gas2", "zero2-gas2", "zero2-standard-chunked", "zero3-gas2"])
def test_muon_matches_single_process(stage: int, gas: int, params: dict, chunk: int | None) -> None:
    results = run_ranks(_train, _config(stage, gas, **params), gas, chunk)
    ref_losses, ref_state = _reference(gas, 2, **params)
    for r, res in enumerate(results):
        assert res["is_muon"] and res["muon_sizes"] == [128, 256, 256, 64]  # the 4 weights (DeepSpeed's rule)
        assert_close_rel(res["losses"], ref_losses, what=f"rank {r} losses")
        for name, value in res["state"].items():
            assert_close_rel(value, ref_state[name], what=f"rank {r} {name}")
    if stage > 0:  # some weights have elements on both ranks, so Newton-Schulz needed the gathered matrix
        split = [k for k in range(4) if results[0]["pieces"][k] and results[1]["pieces"][k]]
        assert split, [res["pieces"] for res in results]


def _resume_run(cfg: dict, tmp: str, phase: str) -> dict:
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    rank = engine.topology.coord("dp")
    if phase == "resume":
        engine.load_checkpoint(tmp)
    steps = range(STEPS) if phase == "straight" else (range(2) if phase == "first" else range(2, STEPS))
    for step in steps:
        engine.backward(mse_loss(engine, *rank_batch(step, rank)))
        engine.step()
    if phase == "first":
        engine.save_checkpoint(tmp)
    with GatheredParameters(list(engine.module.parameters())):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("stage", [2, 3])
def test_muon_momentum_survives_a_checkpoint(stage: int, tmp_path) -> None:
    cfg = _config(stage, 1)
    straight = run_ranks(_resume_run, cfg, str(tmp_path), "straight")
    run_ranks(_resume_run, cfg, str(tmp_path), "first")
    resumed = run_ranks(_resume_run, cfg, str(tmp_path), "resume")
    for r in range(2):
        for name, value in resumed[r].items():
            torch.testing.assert_close(value, straight[r][name], rtol=1e-6, atol=1e-7,
                                       msg=lambda m, name=name: f"{name}: {m}")


def _bf16_run(stage: int) -> list[float]:
    cfg = {**_config(stage, 1), "bf16": {"enabled": True}}
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    losses = []
    for step in range(STEPS):
        x, y = rank_batch(step, engine.topology.coord("dp"))
        loss = mse_loss(engine, x.bfloat16(), y.bfloat16())
        engine.backward(loss)
        engine.step()
        total = loss.detach().float()
        comm.all_reduce(total)
        losses.append(total.item() / 2)
    return losses


@pytest.mark.parametrize("stage", [1, 3])
def test_muon_with_bf16_follows_the_fp32_reference_loosely(stage: int) -> None:
    """bf16 weights and gradients (fp32 masters): losses within 2% of the float64 reference (bf16 rounding)."""
    losses = run_ranks(_bf16_run, stage)[0]
    ref_losses, _ = _reference(1, 2)
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= 0.02 * abs(want), (losses, ref_losses)
