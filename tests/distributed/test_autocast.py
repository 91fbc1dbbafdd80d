"""``torch_autocast`` (bf16 on CPU) on ZeRO stages 0-3 and the pipeline, against single-process fp32 training under
the same ``torch.autocast``; fp16 autocast's loss scale; the config's refusals.

Stated tolerance: losses and final weights within ``RTOL`` = 1e-3 of the single-process autocast run, as
max|a - b| / max|b| per tensor (every rank multiplies its own micro-batch in bf16, so the bf16 partial sums of the
weight gradients are grouped differently from the single process's). Measured on this harness: 1.4e-4 on every stage
(3 steps of SGD with momentum on the tiny MLP). SGD, not Adam: Adam turns the bf16 rounding noise of near-zero
gradient elements into full-size updates (8% apart after 3 steps, in either layout against the other), which would
measure Adam, not the engine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import shardwise
from shardwise import comm
from shardwise.config.errors import ConfigError
from shardwise.pipe import PipelineModule
from shardwise.zero import GatheredParameters
from tests.dist import run_ranks
from tests.models import global_batch, rank_batch, tiny_mlp
from tests.pipe_models import BASE_SEED, pair_mlp_specs, reference_module

STEPS = 3
GAS = 2
CLIP = 0.05
LR = 0.1
RTOL = 1e-3


def _cfg(stage: int, **extra: object) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": GAS, "gradient_clipping": CLIP,
        "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": 0.9}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 200},
        "torch_autocast": {"enabled": True, "dtype": "bfloat16"}, **extra,
    }


def _train(cfg: dict, plain: bool) -> tuple[list[float], dict[str, torch.Tensor], list[str]]:
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    rank = engine.topology.coord("dp")
    losses = []
    out_dtypes = set()
    for step in range(STEPS):
        total = torch.zeros(())
        for micro in range(GAS):
            x, y = rank_batch(step, rank, micro)
            out = engine(x)
            out_dtypes.add(str(out.dtype))
            loss = F.mse_loss(out.float(), y)
            loss.backward() if plain else engine.backward(loss)
            engine.step()
            total += loss.detach()
        comm.all_reduce(total)
        losses.append(total.item() / (GAS * engine.dp_world_size))
    with GatheredParameters(list(engine.module.parameters())):
        params = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return losses, params, sorted(out_dtypes)


def _reference(model: torch.nn.Module, loss_fn=None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process fp32 training, forward under torch.autocast(cpu, bf16), one AdamW step per global batch."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for step in range(STEPS):
        batches = global_batch(step, 2, GAS)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = F.mse_loss(out.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rel(a: torch.Tensor | list[float], b: torch.Tensor | list[float]) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_autocast_matches_single_process(stage: int) -> None:
    results = run_ranks(_train, _cfg(stage), stage % 2 == 1)  # stages 1 and 3 with plain loss.backward()
    ref_losses, ref_params = _reference(tiny_mlp(seed=0))
    for rank, (losses, params, dtypes) in enumerate(results):
        assert dtypes == ["torch.bfloat16"], dtypes  # the forward really ran under autocast
        worst = max([_rel(losses, ref_losses)] + [_rel(v, ref_params[k]) for k, v in params.items()])
        assert worst <= RTOL, f"rank {rank}: worst relative difference {worst:.2e} > {RTOL}"
        assert all(v.dtype == torch.float32 for v in params.values())  # weights stay fp32


def _pipe(extra: dict) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = PipelineModule(pair_mlp_specs(1), num_stages=2, loss_fn=lambda out, y: F.mse_loss(out.float(), y),
                           seed_layers=True, base_seed=BASE_SEED, partition_method="uniform")
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": GAS, "gradient_clipping": CLIP,
           "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": 0.9}}, **extra}
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
    losses = [engine.train_batch(iter([rank_batch(step, 0, m) for m in range(GAS)])).item() for step in range(STEPS)]
    return losses, {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_autocast_pipeline_matches_single_process() -> None:
    auto = run_ranks(_pipe, {"torch_autocast": {"enabled": True}})  # dtype null: CPU's default, bf16
    plain = run_ranks(_pipe, {})
    ref = reference_module(pair_mlp_specs(1)).float()
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    ref_losses = []
    for step in range(STEPS):  # dp 1: the global batch is rank 0's micro-batches
        batches = global_batch(step, 1, GAS)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(ref(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_losses.append(loss.item())
    for rank in range(2):
        assert _rel(auto[rank][0], ref_losses) <= RTOL
        assert auto[rank][0] != plain[rank][0]  # autocast changed the numerics: it ran
    ref_state = ref.state_dict()
    for rank in range(2):
        for name, value in auto[rank][1].items():
            assert _rel(value, ref_state[name]) <= RTOL, name


def _fp16_scale() -> tuple:
    cfg = _cfg(2, torch_autocast={"enabled": True, "dtype": "fp16"})
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    return (engine.get_loss_scale(), engine.torch_autocast_enabled(), engine.torch_autocast_dtype(),
            engine.torch_autocast_lower_precision_safe_modules())


def test_fp16_autocast_gets_a_dynamic_loss_scale_and_the_accessors_answer() -> None:
    scale, enabled, dtype, safe = run_ranks(_fp16_scale)[0]
    assert scale == 2.0**16 and enabled and dtype == torch.float16
    assert safe == ["torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d", "torch.nn.Conv3d"]


def _bad(cfg: dict) -> str:
    with pytest.raises(ConfigError) as info:
        shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    return str(info.value)


def test_autocast_refusals_name_the_key() -> None:
    msg = run_ranks(_bad, _cfg(1, torch_autocast={"enabled": True, "lower_precision_safe_modules": ["nn.Nope"]}))
    assert "torch_autocast.lower_precision_safe_modules" in msg[0]
    msg = run_ranks(_bad, {**_cfg(3), "zero_optimization": {"stage": 3, "zero_quantized_weights": True}})
    assert "torch_autocast.enabled" in msg[0] and "zero_quantized_weights" in msg[0]
