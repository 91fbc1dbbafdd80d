"""The ZeRO inspection API (``shardwise.utils.safe_get_full_*`` and friends) on stages 0-2 (and 3: same code).

Every getter is checked against values computed independently on the rank (a plain copy of the model for
gradients, Adam's closed form after one step for the optimizer state), every setter by reading back and by its
effect on the next optimizer step, and the local variants by tiling the parameter with every rank's pieces.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist

import shardwise
from shardwise import comm
from shardwise.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_grad,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_grad,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_grad,
    safe_set_local_optimizer_state,
    safe_update_full_grad_vectorized,
)
from tests.dist import run_ranks
from tests.models import mse_loss, rank_batch, tiny_mlp

LR = 1e-2


def _config(stage: int, precision: str, offload: bool, **extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "Adam", "params": {"lr": LR, "weight_decay": 0.0}},
        # 200-element buckets: the MLP's 756 elements span several buckets, so most parameters are split across
        # the two ranks and one (the last bias) lies entirely in one rank's slice
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 200},
        **extra,
    }
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if precision != "fp32":
        cfg[precision] = {"enabled": True}
        if precision == "fp16":
            cfg["fp16"]["initial_scale_power"] = 4
    return cfg


def _batch(engine, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch, inputs in the model's dtype (as a bf16/fp16 training script casts them)."""
    x, y = rank_batch(step, engine.topology.coord("dp"))
    return x.to(next(engine.module.parameters()).dtype), y


def _loss(engine, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(engine(x).float(), y)


def _reference_grads(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """The data-parallel average gradient, from a plain fp32 copy of the model and torch.distributed directly."""
    ref = copy.deepcopy(model).float()
    x, y = rank_batch(0, rank)
    mse_loss(ref, x, y).backward()
    out = {}
    for name, p in ref.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g)
        out[name] = g / dist.get_world_size()
    return out


def _inspect_body(stage: int, precision: str, offload: bool) -> dict:
    model = tiny_mlp(seed=0)
    reference = _reference_grads(model, dist.get_rank())
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, _, _, _ = shardwise.initialize(model=model, config=_config(stage, precision, offload))
    rank = engine.topology.coord("dp")
    named = dict(engine.module.named_parameters())
    lowp = precision != "fp32"
    scale = engine.get_loss_scale()

    # before any step: master weights are the initial weights (rounded to the model dtype in 16-bit)
    for n, p in named.items():
        full = safe_get_full_fp32_param(p)
        assert full.dtype == torch.float32 and full.shape == p.shape, n
        expect = initial[n].to(p.dtype).float()
        torch.testing.assert_close(full, expect, rtol=0, atol=0, msg=n)
    with pytest.raises(ValueError, match="first step"):
        safe_get_full_optimizer_state(named["0.weight"], "exp_avg")

    engine.backward(_loss(engine, *_batch(engine, 0)))
    grads = {}
    for n, p in named.items():
        g = safe_get_full_grad(p)
        assert g.dtype == torch.float32 and g.shape == p.shape, n
        grads[n] = g.clone()
        tol = dict(rtol=0.05, atol=2e-3 * scale) if lowp else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g, reference[n] * scale, **tol, msg=n)
        _check_local_tiling(engine, p, g, safe_get_local_grad(p), n)
    engine.step()

    # after one Adam step from zero state: m = (1 - b1) g, v = (1 - b2) g^2 with g the unscaled average gradient
    for n, p in named.items():
        g = grads[n] / scale
        m, v = safe_get_full_optimizer_state(p, "exp_avg"), safe_get_full_optimizer_state(p, "exp_avg_sq")
        torch.testing.assert_close(m, 0.1 * g, rtol=1e-5, atol=1e-9, msg=n)
        torch.testing.assert_close(v, 0.001 * g * g, rtol=1e-4, atol=1e-12, msg=n)
        _check_local_tiling(engine, p, m, safe_get_local_optimizer_state(p, "exp_avg"), n)
        master = safe_get_full_fp32_param(p)
        _check_local_tiling(engine, p, master, safe_get_local_fp32_param(p), n)
        torch.testing.assert_close(p.detach().float(), master.to(p.dtype).float(), rtol=0, atol=0, msg=n)
    return {"stage": stage, "rank": rank}


def _check_local_tiling(engine, p, full: torch.Tensor, local: torch.Tensor, name: str) -> None:
    """This rank's local piece is exactly its fragments' range of the full value, and the pieces tile the param."""
    frags = engine.strategy.fragments(p)
    expect = torch.cat([full.reshape(-1)[f.start : f.end] for f in frags]) if frags else full.new_zeros(0)
    torch.testing.assert_close(local, expect, rtol=1e-6, atol=0, msg=name)
    held = torch.tensor([float(local.numel())])
    comm.all_reduce(held, group=engine.strategy.state_group)  # size-1 groups (stage 0) skip the collective
    assert int(held.item()) == p.numel(), f"{name}: pieces cover {int(held.item())} of {p.numel()} elements"


CASES = [(0, "fp32", False), (1, "fp32", False), (2, "fp32", False), (0, "bf16", False), (1, "bf16", False),
         (2, "bf16", False), (2, "fp16", False), (1, "fp32", True), (2, "bf16", True),
         (3, "fp32", False), (3, "bf16", False)]  # ZeRO-3: the same code, through its fragments()


@pytest.mark.parametrize("stage,precision,offload", CASES, ids=[f"s{s}-{p}{'-offload' if o else ''}"
                                                                 for s, p, o in CASES])
def test_getters_match_independent_values(stage: int, precision: str, offload: bool) -> None:
    results = run_ranks(_inspect_body, stage, precision, offload)
    assert [r["rank"] for r in results] == [0, 1]


def _setters_body(stage: int, precision: str) -> None:
    model = tiny_mlp(seed=0)
    engine, _, _, _ = shardwise.initialize(model=model, config=_config(stage, precision, False))
    rank = engine.topology.coord("dp")
    params = list(engine.module.parameters())
    engine.backward(_loss(engine, *_batch(engine, 0)))
    engine.step()  # optimizer state now exists

    gen = torch.Generator().manual_seed(7)  # the same values on every rank, as the API requires
    new = {id(p): torch.randn(p.shape, generator=gen) for p in params}
    for p in params:
        safe_set_full_fp32_param(p, new[id(p)])
        safe_set_full_optimizer_state(p, torch.zeros(p.shape), "exp_avg")
        safe_set_full_optimizer_state(p, torch.zeros(p.shape), "exp_avg_sq")
    for p in params:
        torch.testing.assert_close(safe_get_full_fp32_param(p), new[id(p)], rtol=0, atol=0)
        assert torch.count_nonzero(safe_get_full_optimizer_state(p, "exp_avg_sq")) == 0

    # a step on zero gradients and zero state moves nothing: the model shows exactly the values that were set
    engine.backward(_loss(engine, *_batch(engine, 1)))
    safe_update_full_grad_vectorized(params, lambda g, p: torch.zeros_like(g))
    for p in params:
        assert torch.count_nonzero(safe_get_full_grad(p)) == 0
    engine.step()
    for p in params:
        torch.testing.assert_close(p.detach().float(), new[id(p)].to(p.dtype).float(), rtol=0, atol=0)

    # a set gradient is what the optimizer steps on: from m = v = 0 at Adam's 3rd step, g = 0.5 moves every weight
    # by lr * (0.1 g / (1 - 0.9^3)) / sqrt(0.001 g^2 / (1 - 0.999^3))
    engine.backward(_loss(engine, *_batch(engine, 2)))
    for p in params:
        safe_set_full_optimizer_state(p, torch.zeros(p.shape), "exp_avg")
        safe_set_full_optimizer_state(p, torch.zeros(p.shape), "exp_avg_sq")
        safe_set_full_grad(p, torch.full(p.shape, 0.5))
        torch.testing.assert_close(safe_get_full_grad(p), torch.full(p.shape, 0.5))
    before = {id(p): safe_get_full_fp32_param(p) for p in params}
    engine.step()
    for p in params:
        step = before[id(p)] - safe_get_full_fp32_param(p)
        expect = LR * (0.1 / (1 - 0.9**3)) / math.sqrt(0.001 / (1 - 0.999**3))
        torch.testing.assert_close(step, torch.full(p.shape, expect), rtol=1e-4, atol=1e-7)

    # local setters write this rank's piece only; the full value shows each rank's write in its own range
    for p in params:
        local = safe_get_local_fp32_param(p)
        safe_set_local_fp32_param(p, torch.full_like(local, float(rank + 1)))
        safe_set_local_optimizer_state(p, torch.full_like(local, 3.0), "exp_avg")
        full = safe_get_full_fp32_param(p).reshape(-1)
        for f in engine.strategy.fragments(p):
            assert torch.all(full[f.start : f.end] == rank + 1)
        assert set(full.unique().tolist()) <= {1.0, 2.0}
        assert torch.all(safe_get_full_optimizer_state(p, "exp_avg") == 3.0)
    engine.backward(_loss(engine, *_batch(engine, 3)))
    for p in params:
        local = safe_get_local_grad(p)
        safe_set_local_grad(p, torch.full_like(local, -1.0))
        assert torch.all(safe_get_full_grad(p) == -1.0)
    with pytest.raises(ValueError, match="elements"):
        safe_set_full_fp32_param(params[0], torch.zeros(3))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_setters_round_trip_and_drive_the_step(stage: int, precision: str) -> None:
    run_ranks(_setters_body, stage, precision)


def _frozen_body(stage: int) -> None:
    model = tiny_mlp(seed=0)
    model[0].weight.requires_grad_(False)
    engine, _, _, _ = shardwise.initialize(model=model, config=_config(stage, "fp32", False))
    frozen = engine.module[0].weight
    engine.backward(_loss(engine, *_batch(engine, 0)))
    engine.step()
    for getter in (safe_get_full_fp32_param, safe_get_full_grad, safe_get_local_fp32_param, safe_get_local_grad):
        assert getter(frozen) is None, getter.__name__
    assert safe_get_full_optimizer_state(frozen, "exp_avg") is None
    safe_set_full_fp32_param(frozen, torch.zeros(frozen.shape))  # ignored, as in DeepSpeed
    assert torch.count_nonzero(frozen) > 0
    assert safe_get_full_fp32_param(engine.module[0].bias) is not None
    # an unknown state key is an error on every rank (no rank is left waiting in the all-reduce)
    with pytest.raises(ValueError, match="'momentum_buffer' is not available"):
        safe_get_full_optimizer_state(engine.module[0].bias, "momentum_buffer")


@pytest.mark.parametrize("stage", [0, 2])
def test_frozen_and_unknown(stage: int) -> None:
    run_ranks(_frozen_body, stage)


class _Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * x).sum()


def _accum_dtype_body(stage: int, accum: str | None) -> float:
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "bf16": {"enabled": True},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-6}}, "zero_optimization": {"stage": stage}}
    if accum:
        cfg["data_types"] = {"grad_accum_dtype": accum}
    engine, _, _, _ = shardwise.initialize(model=_Scale(), config=cfg)
    local = 1.0 if dist.get_rank() == 0 else 1.0078125  # both exact in bf16; their mean 1 + 2**-8 is not
    engine.backward(engine(torch.full((4,), local, dtype=torch.bfloat16)))
    grad = safe_get_full_grad(engine.module.weight)
    assert grad.dtype == torch.float32
    return grad[0].item()


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_fp32_gradient_accumulation_keeps_the_exact_mean(stage: int) -> None:
    values = run_ranks(_accum_dtype_body, stage, "fp32")
    assert values == [1.00390625, 1.00390625]


def test_bf16_gradient_accumulation_rounds_the_sum() -> None:
    """The contrast: ZeRO-2 with bf16 accumulation (its default under bf16) rounds 2.0078125 to a bf16 value."""
    values = run_ranks(_accum_dtype_body, 2, None)
    assert values[0] == values[1] and values[0] != 1.00390625
