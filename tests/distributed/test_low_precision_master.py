"""16-bit master weights, gradients and optimizer states (DeepSpeed 0.19's ``bf16.bf16_master_weights_and_grads``,
``bf16.bf16_optimizer_states``, ``fp16.fp16_master_weights_and_grads``) on ZeRO stages 1-3: the dtypes, the bytes
``memory_breakdown()`` and the estimator report, the loss against the fp32-master run, and the refusals.

Stated tolerance: every step's loss within ``LOSS_RTOL`` = 5% relative of the same run with fp32 masters (tiny GPT,
20 steps of AdamW at lr 5e-3 on 4 repeating batches, 2 ranks; the loss falls from 4.16 to about 3). The 16-bit master
rounds every update to 8 (bf16) or 11 (fp16) mantissa bits, so small updates are partly lost: the curves drift apart
slowly rather than differing by noise. The measured curves are in benchmarks/RESULTS.md ("16-bit master weights").
"""

from __future__ import annotations

import pytest
import torch

import shardwise
from shardwise import comm
from shardwise.config.errors import ConfigError
from shardwise.zero.estimate import estimate_model_states
from tests.dist import run_ranks
from tests.models import rank_batch, tiny_transformer

STEPS = 20
LOSS_RTOL = 0.05


def _cfg(stage: int, precision: str = "bf16", master16: bool = False, states16: bool = False,
         offload: bool = False) -> dict:
    zero: dict = {"stage": stage, "reduce_bucket_size": 4000}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    block: dict = {"enabled": True}
    if precision == "bf16" and master16:
        block["bf16_master_weights_and_grads"] = True
    if states16:
        block["bf16_optimizer_states"] = True
    if precision == "fp16":
        block.update(initial_scale_power=12, fp16_master_weights_and_grads=master16)
    return {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "weight_decay": 0.01}},
            "zero_optimization": zero, precision: block}


def _train(cfg: dict, steps: int = STEPS) -> dict:
    engine, _, _, _ = shardwise.initialize(model=tiny_transformer(seed=0), config=cfg)
    rank = engine.topology.coord("dp")
    losses = []
    for step in range(steps):
        x, y = rank_batch(step % 4, rank, kind="gpt")
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        total = loss.detach().float().clone()
        comm.all_reduce(total)
        losses.append(total.item() / engine.dp_world_size)
    opt = engine.strategy.optimizer
    groups = opt.live_groups
    state_dtypes = sorted({str(v.dtype) for st in opt.basic.state.values() for v in st.values()
                           if torch.is_tensor(v) and v.numel() > 1})
    grad_dtypes = sorted({str(t.dtype) for g in groups for t in (g.part_grad, g.full_grad) if t is not None})
    flags = (engine.bf16_master_weights_and_gradients(), engine.bf16_optimizer_states(),
             engine.fp16_master_weights_and_gradients())
    return {"flags": flags, "losses": losses, "memory": engine.memory_breakdown(), "master": sorted({str(g.master.dtype)
            for g in groups}), "states": state_dtypes, "grads": grad_dtypes,
            "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_master_and_states(stage: int) -> None:
    low = run_ranks(_train, _cfg(stage, master16=True, states16=True))
    ref = run_ranks(_train, _cfg(stage))
    for rank in range(2):
        got, want = low[rank], ref[rank]
        assert got["master"] == ["torch.bfloat16"] and want["master"] == ["torch.float32"]
        assert got["states"] == ["torch.bfloat16"] and want["states"] == ["torch.float32"]
        assert got["grads"] == ["torch.bfloat16"]
        assert got["flags"] == (True, True, False) and want["flags"] == (False, False, False)
        # half the bytes for master weights and optimizer states
        assert got["memory"]["master_weights"] * 2 == want["memory"]["master_weights"]
        assert got["memory"]["optimizer_states"] * 2 == want["memory"]["optimizer_states"]
        for step, (a, b) in enumerate(zip(got["losses"], want["losses"])):
            assert abs(a - b) <= LOSS_RTOL * abs(b), f"rank {rank} step {step}: {a} vs fp32 masters {b}"
        assert got["losses"][-1] < 0.95 * got["losses"][0]  # it trains
        est = estimate_model_states(got["params"], 2, stage, "bf16", low_precision_master=True,
                                    low_precision_optimizer_states=True)
        # (ZeRO-3 keeps this tiny model's small layers gathered: "parameters" is above the estimate's P/N)
        for kind in ("gradients", "master_weights", "optimizer_states"):
            value = getattr(est, kind)
            assert abs(value - got["memory"][kind]) <= 0.05 * value, (kind, est, got["memory"])


@pytest.mark.parametrize(("stage", "precision"), [(2, "bf16"), (1, "fp16"), (3, "fp16")])
def test_16bit_master_with_fp32_states_on_offload(stage: int, precision: str) -> None:
    low = run_ranks(_train, _cfg(stage, precision, master16=True, offload=True), 6)
    ref = run_ranks(_train, _cfg(stage, precision, offload=True), 6)
    for rank in range(2):
        got, want = low[rank], ref[rank]
        assert got["master"] == [f"torch.{'bfloat16' if precision == 'bf16' else 'float16'}"]
        assert got["states"] == ["torch.float32"]
        assert got["memory"]["master_weights"] * 2 == want["memory"]["master_weights"]
        for a, b in zip(got["losses"], want["losses"]):
            assert abs(a - b) <= LOSS_RTOL * abs(b)


def _refused(cfg: dict) -> str:
    with pytest.raises(ConfigError) as info:
        shardwise.initialize(model=tiny_transformer(seed=0), config=cfg)
    return str(info.value)


@pytest.mark.parametrize(("cfg", "words"), [
    (_cfg(2, master16=True), ["bf16.bf16_master_weights_and_grads", "offload_optimizer.device"]),
    (_cfg(1, "fp16", master16=True), ["fp16.fp16_master_weights_and_grads", "offload_optimizer.device"]),
    (_cfg(2, states16=True), ["bf16.bf16_optimizer_states", "bf16_master_weights_and_grads"]),
    ({**_cfg(2, master16=True, states16=True), "data_types": {"grad_accum_dtype": "fp32"}},
     ["grad_accum_dtype"]),
], ids=["bf16-master-no-offload", "fp16-master-no-offload", "states-without-master", "fp32-accum"])
def test_refusals_name_the_key_and_fix(cfg: dict, words: list[str]) -> None:
    message = run_ranks(_refused, cfg)[0]
    for word in words:
        assert word in message, message


def _resume(cfg: dict, path: str, load: bool) -> list[float]:
    engine, _, _, _ = shardwise.initialize(model=tiny_transformer(seed=0), config=cfg)
    rank = engine.topology.coord("dp")
    start = 0
    if load:
        engine.load_checkpoint(path)
        start = 3
    losses = []
    for step in range(start, 5):
        if step == 3 and not load:
            engine.save_checkpoint(path)
        x, y = rank_batch(step % 4, rank, kind="gpt")
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        if step >= 3:
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_resume_with_bf16_masters_is_exact(stage: int, tmp_path) -> None:
    cfg = _cfg(stage, master16=True, states16=True)
    first = run_ranks(_resume, cfg, str(tmp_path), False)
    second = run_ranks(_resume, cfg, str(tmp_path), True)
    assert first == second


def _blog_recipe(stage: int) -> dict:
    """DeepSpeed's low-precision example: torch_autocast + bf16 masters and states, plain loss.backward()."""
    cfg = {**_cfg(stage, master16=True, states16=True), "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    engine, _, _, _ = shardwise.initialize(model=tiny_transformer(seed=0), config=cfg)
    rank = engine.topology.coord("dp")
    losses = []
    for step in range(8):
        x, y = rank_batch(step % 4, rank, kind="gpt")
        loss = engine(x, y)
        loss.backward()
        engine.step()
        losses.append(loss.item())
    return {"losses": losses, "autocast": engine.torch_autocast_enabled(),
            "master": str(engine.strategy.optimizer.live_groups[0].master.dtype)}


@pytest.mark.parametrize("stage", [2, 3])
def test_autocast_with_bf16_masters_and_plain_backward(stage: int) -> None:
    for res in run_ranks(_blog_recipe, stage):
        assert res["autocast"] and res["master"] == "torch.bfloat16"
        assert all(torch.isfinite(torch.tensor(res["losses"])))
        assert res["losses"][-1] < res["losses"][0]
