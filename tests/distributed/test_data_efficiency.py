"""Curriculum learning and random-LTD on 2 ranks against single-process PyTorch fed the same (truncated, token-
dropped) batches; the truncation lengths and kept-token counts against hand-computed schedules; resumption."""

from __future__ import annotations

import copy

import pytest
import torch

import shardwise
from shardwise import comm
from shardwise.data import DataSampler, RandomLayerTokenDrop, RandomLTDScheduler, convert_to_random_ltd, truncate_batch
from shardwise.data import random_ltd as ltd_mod
from shardwise.models.gpt import Block
from shardwise.zero import GatheredParameters
from tests.data_models import TinyLM, TokenPairs
from tests.dist import run_ranks
from tests.models import assert_close_rel, assert_state_close, tiny_transformer

STEPS, GAS, MICRO, DP = 4, 2, 2, 2
CLIP = 0.05
ADAM = {"lr": 1e-2, "weight_decay": 0.01, "eps": 1e-6}  # eps: see test_zero3.py (GPT's zero-gradient key bias)
SEQLEN = {"seqlen_truncate": {"difficulty_type": "value", "clustering_type": "single_cluster", "min_difficulty": 4,
                              "max_difficulty": 16, "schedule_type": "fixed_linear",
                              "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 4}}}
# fixed_linear 4 -> 16 over 6 steps in multiples of 4: floor(s/6*12 + 4) = 6, 8, 10, 12 for steps 1-4
LENGTHS = [4, 8, 8, 12]


def _config(stage: int, gas: int = GAS, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas, "gradient_clipping": CLIP,
            "optimizer": {"type": "AdamW", "params": ADAM}, "zero_optimization": {"stage": stage}, **extra}


def _curriculum(seed: int = 7) -> dict:
    return {"data_efficiency": {"enabled": True, "seed": seed, "data_sampling": {
        "enabled": True, "curriculum_learning": {"enabled": True, "curriculum_metrics": SEQLEN}}}}


def _state(engine) -> dict[str, torch.Tensor]:
    with GatheredParameters(list(engine.module.parameters())):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _train_steps(engine, batches, steps: int, gas: int) -> list[float]:
    losses = []
    for _ in range(steps):
        total = torch.zeros(())
        for _ in range(gas):
            x, y = batches()
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        comm.all_reduce(total)
        losses.append(total.item() / (gas * engine.dp_world_size))
    return losses


def _reference(model, global_batches, loss_fn=lambda m, x, y: m(x, y)) -> tuple[list[float], dict]:
    """Single-process fp32 training: one AdamW step per global batch, clipped as the engine clips."""
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), **ADAM)
    losses = []
    for x, y in global_batches:
        loss = loss_fn(ref, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in ref.state_dict().items()}


# -- curriculum data sampling ---------------------------------------------------------------------------------------
def _curriculum_run(stage: int) -> dict:
    data = TokenPairs(64, vocab=64)
    engine, _, loader, _ = shardwise.initialize(model=tiny_transformer(seed=0), config={**_config(stage),
                                                **_curriculum()}, training_data=data)
    seen = []

    def batches():
        x, y = next(loader)
        seen.append((x, y))
        return x, y

    losses = _train_steps(engine, batches, STEPS, GAS)
    return {"losses": losses, "state": _state(engine), "seen": seen}


def _expected_rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What rank ``rank`` must read: the sampler's ids, the samples, cut to the hand-computed lengths."""
    data = TokenPairs(64, vocab=64)
    cfg = shardwise.config.load_config({**_config(0), **_curriculum()}, dp_world_size=DP, log=False)
    it = iter(DataSampler(cfg.data_efficiency, len(data), MICRO, rank, DP, GAS))
    out = []
    for step in range(STEPS):
        for _ in range(GAS):
            ids = next(it)
            x = torch.stack([data[i][0] for i in ids])
            y = torch.stack([data[i][1] for i in ids])
            out.append(truncate_batch((x, y), LENGTHS[step]))
    return out


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_curriculum_training_matches_single_process(stage: int) -> None:
    results = run_ranks(_curriculum_run, stage)
    expected = [_expected_rank_batches(r) for r in range(DP)]
    for r, res in enumerate(results):
        assert [x.shape[1] for x, _ in res["seen"]] == [n for n in LENGTHS for _ in range(GAS)]
        for (x, y), (ex, ey) in zip(res["seen"], expected[r]):
            assert torch.equal(x, ex) and torch.equal(y, ey)
    glob = [tuple(torch.cat([expected[r][s * GAS + m][i] for r in range(DP) for m in range(GAS)]) for i in (0, 1))
            for s in range(STEPS)]
    ref_losses, ref_state = _reference(tiny_transformer(seed=0), glob)
    for r, res in enumerate(results):
        assert_close_rel(res["losses"], ref_losses, what=f"rank {r} losses")
        assert_state_close(res["state"], ref_state, rtol=2e-5, what=f"rank {r}")


def _resume_run(tmp: str, phase: str) -> dict:
    data = TokenPairs(64, vocab=64)
    engine, _, loader, _ = shardwise.initialize(model=tiny_transformer(seed=0), config={**_config(1),
                                                **_curriculum()}, training_data=data)
    lengths = []

    def batches():
        x, y = next(loader)
        lengths.append(x.shape[1])
        return x, y

    if phase == "resume":
        engine.load_checkpoint(tmp)
    losses = _train_steps(engine, batches, 2 if phase != "straight" else STEPS, GAS)
    if phase == "first":
        engine.save_checkpoint(tmp)
    return {"losses": losses, "lengths": lengths, "state": _state(engine)}


def test_curriculum_state_survives_a_checkpoint(tmp_path) -> None:
    straight = run_ranks(_resume_run, str(tmp_path), "straight")
    first = run_ranks(_resume_run, str(tmp_path), "first")
    resumed = run_ranks(_resume_run, str(tmp_path), "resume")
    for r in range(DP):
        assert first[r]["lengths"] + resumed[r]["lengths"] == straight[r]["lengths"]
        assert_close_rel(first[r]["losses"] + resumed[r]["losses"], straight[r]["losses"], what="losses")
        assert_state_close(resumed[r]["state"], straight[r]["state"], rtol=1e-6, what=f"rank {r}")


# -- legacy curriculum_learning (curriculum_seqlen passed to forward) -----------------------------------------------
LEGACY = {"curriculum_learning": {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 4,
                                  "max_difficulty": 16, "schedule_type": "fixed_linear",
                                  "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 4}}}


def _rank_pairs(step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = TokenPairs(64)
    i = ((step * DP + rank) * GAS + micro) * MICRO
    return data.data[i:i + MICRO, :-1], data.data[i:i + MICRO, 1:]


def _legacy_run() -> dict:
    model = TinyLM(layers=3, seed=0)
    engine, _, _, _ = shardwise.initialize(model=model, config={**_config(1), **LEGACY})
    losses = _legacy_loop(engine, engine.topology.coord("dp"))
    return {"losses": losses, "state": _state(engine), "lengths": list(model.seen_lengths)}


def _legacy_loop(engine, rank: int) -> list[float]:
    losses = []
    for step in range(STEPS):
        total = torch.zeros(())
        for micro in range(GAS):
            loss = engine(*_rank_pairs(step, rank, micro))
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        comm.all_reduce(total)
        losses.append(total.item() / (GAS * DP))
    return losses


def test_legacy_curriculum_passes_curriculum_seqlen_and_matches_single_process() -> None:
    results = run_ranks(_legacy_run)
    glob = []
    for step in range(STEPS):
        pairs = [_rank_pairs(step, r, m) for r in range(DP) for m in range(GAS)]
        glob.append(truncate_batch((torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])),
                                   LENGTHS[step]))
    ref_losses, ref_state = _reference(TinyLM(layers=3, seed=0), glob)
    for r, res in enumerate(results):
        assert res["lengths"] == [n for n in LENGTHS for _ in range(GAS)]  # difficulty at global_steps + 1
        assert_close_rel(res["losses"], ref_losses, what=f"rank {r} losses")
        assert_state_close(res["state"], ref_state, rtol=2e-5, what=f"rank {r}")


# -- random-LTD ------------------------------------------------------------------------------------------------------
RANDOM_LTD = {"data_efficiency": {"data_routing": {"random_ltd": {
    "enabled": True, "total_layer_num": 2, "random_ltd_layer_num": 2, "random_ltd_layer_id": [0, 1],
    "model_mask_name": None, "model_type": "decoder", "hidden_state_order": "batch_seq_dim",
    "random_ltd_schedule": {"min_value": 8, "max_value": 16, "schedule_type": "fixed_linear",
                            "schedule_config": {"require_steps": 4, "seq_per_step": 4}}}}}}
KEPT = [8, 8, 12, 12]  # floor(s/4 * 8 + 8) = 8, 10, 12, 14 -> multiples of 4


def _gpt_pairs(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = TokenPairs(64, vocab=64)
    i = (step * DP + rank) * MICRO
    return data.data[i:i + MICRO, :-1], data.data[i:i + MICRO, 1:]


def _ltd_run(stage: int, convert_first: bool) -> dict:
    model = tiny_transformer(seed=0)
    if convert_first:
        convert_to_random_ltd(model, Block)
    engine, _, _, _ = shardwise.initialize(model=model, config={**_config(stage, gas=1), **RANDOM_LTD})
    if not convert_first:
        convert_to_random_ltd(engine, Block)
    rank = engine.topology.coord("dp")
    losses, kept, indices = [], [], []
    for step in range(STEPS):
        loss = engine(*_gpt_pairs(step, rank))
        kept.append(engine.random_ltd_scheduler.get_current_seq())
        indices.append(engine.random_ltd_scheduler.state["sample_idx"].clone())
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        comm.all_reduce(total)
        losses.append(total.item() / DP)
    state = ltd_mod.remove_random_ltd_state_dict(_state(engine))
    return {"losses": losses, "state": dict(state), "kept": kept, "indices": indices}


@pytest.mark.parametrize(("stage", "convert_first"), [(2, False), (3, True)], ids=["zero2-after", "zero3-before"])
def test_random_ltd_training_matches_single_process(stage: int, convert_first: bool, monkeypatch) -> None:
    results = run_ranks(_ltd_run, stage, convert_first)
    assert all(res["kept"] == KEPT for res in results)
    ref = tiny_transformer(seed=0)
    convert_to_random_ltd(ref, Block)
    cfg = shardwise.config.load_config({"train_batch_size": MICRO * DP, **RANDOM_LTD}, log=False)
    sched = RandomLTDScheduler(cfg.data_efficiency.data_routing.random_ltd, MICRO * DP)
    wrappers = [m for m in ref.modules() if isinstance(m, RandomLayerTokenDrop)]
    for i, w in enumerate(wrappers):
        w.init_config(cfg.data_efficiency.data_routing.random_ltd, sched, i)
    step_of = {"step": 0}

    def same_drops(reserved, seq_len, batch, layers, device):  # the ranks' draws, side by side in the global batch
        assert (reserved, seq_len, batch, layers) == (KEPT[step_of["step"]], 16, MICRO * DP, 2)
        return torch.cat([res["indices"][step_of["step"]] for res in results], dim=1)

    monkeypatch.setattr(ltd_mod, "sample_tokens", same_drops)

    def loss_fn(model, x, y):
        sched.update_seq(step_of["step"])
        return model(x, y)

    glob = [tuple(torch.cat([_gpt_pairs(s, r)[i] for r in range(DP)]) for i in (0, 1)) for s in range(STEPS)]
    ref_losses, ref_state = [], None
    opt = torch.optim.AdamW(ref.parameters(), **ADAM)
    for s, (x, y) in enumerate(glob):
        step_of["step"] = s
        loss = loss_fn(ref, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_losses.append(loss.item())
    ref_state = dict(ltd_mod.remove_random_ltd_state_dict(ref.state_dict()))
    for r, res in enumerate(results):
        assert_close_rel(res["losses"], ref_losses, what=f"rank {r} losses")
        assert_state_close(res["state"], ref_state, rtol=2e-5, what=f"rank {r}")


def _pipeline_refusal() -> str:
    import torch.nn.functional as F

    from shardwise.pipe import PipelineModule
    from tests.pipe_models import pair_mlp_specs

    model = PipelineModule(pair_mlp_specs(1), num_stages=2, loss_fn=lambda out, y: F.mse_loss(out, y),
                           partition_method="uniform")
    with pytest.raises(ValueError) as info:
        shardwise.initialize(model=model, config={**_config(0, gas=1), **LEGACY})
    return str(info.value)


def test_step_driven_features_are_refused_with_the_pipeline_engine() -> None:
    for message in run_ranks(_pipeline_refusal):
        assert "not supported with PipelineModule" in message and "Fix:" in message
