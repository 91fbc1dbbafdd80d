"""Pipeline checkpoints in the layout-independent format: saved with 2 stages, resumed with 1 and 4 stages (and by
a non-pipeline model), training continues with the losses of the uninterrupted 2-stage run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardwise
from shardwise.pipe import LayerSpec, PipelineModule
from tests.dist import run_ranks
from tests.models import assert_close_rel, rank_batch
from tests.pipe_models import BASE_SEED, pair_mlp_specs

GAS = 2


def _config() -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": GAS, "gradient_clipping": 0.05,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
            "zero_optimization": {"stage": 1}}


def _plain_specs() -> list:
    return [LayerSpec(nn.Linear, 8, 16), LayerSpec(nn.GELU), LayerSpec(nn.Linear, 16, 16), LayerSpec(nn.GELU),
            LayerSpec(nn.Linear, 16, 4)]


def _specs(kind: str) -> list:
    return pair_mlp_specs(2) if kind == "tied" else _plain_specs()


def _engine(stages: int, kind: str) -> object:
    model = PipelineModule(_specs(kind), num_stages=stages, loss_fn=F.mse_loss, seed_layers=True,
                           base_seed=BASE_SEED + stages, partition_method="uniform")  # different init per layout
    engine, _, _, _ = shardwise.initialize(model=model, config=_config())
    return engine


def _steps(engine: object, first: int, count: int) -> list[float]:
    dp = engine.topology.coord("dp")
    return [engine.train_batch(iter([rank_batch(s, dp, m) for m in range(GAS)])).item()
            for s in range(first, first + count)]


def _save_then_continue(path: str, kind: str) -> list[float]:
    engine = _engine(2, kind)
    _steps(engine, 0, 2)
    engine.save_checkpoint(path, tag="pp2")
    return _steps(engine, 2, 2)


def _resume(path: str, stages: int, kind: str) -> list[float]:
    engine = _engine(stages, kind)
    load_path, _ = engine.load_checkpoint(path)
    assert load_path is not None and load_path.endswith("pp2")
    assert engine.global_steps == 2
    return _steps(engine, 2, 2)


def _resume_plain(path: str) -> list[float]:
    torch.manual_seed(7)
    model = nn.Sequential(*[spec.build() for spec in _plain_specs()])
    engine, _, _, _ = shardwise.initialize(model=model, config=_config())
    engine.load_checkpoint(path)
    dp = engine.topology.coord("dp")
    losses = []
    for step in (2, 3):
        total = 0.0
        for m in range(GAS):
            x, y = rank_batch(step, dp, m)
            loss = F.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        losses.append(total / GAS)
    return losses


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, list[float]]]:
    out = {}
    for kind in ("tied", "plain"):
        path = str(tmp_path_factory.mktemp(f"pipe-ckpt-{kind}"))
        out[kind] = (path, run_ranks(_save_then_continue, path, kind)[0])
    return out


def test_resume_with_one_stage(saved: dict) -> None:
    path, expected = saved["tied"]
    (losses,) = run_ranks(_resume, path, 1, "tied", world_size=1)
    assert_close_rel(losses, expected, rtol=1e-6, atol=1e-7, what="PP=2 -> PP=1")


@pytest.mark.world4
def test_resume_with_four_stages(saved: dict) -> None:
    path, expected = saved["tied"]
    for losses in run_ranks(_resume, path, 4, "tied", world_size=4):
        assert_close_rel(losses, expected, rtol=1e-6, atol=1e-7, what="PP=2 -> PP=4")


def test_a_plain_model_loads_pipeline_weights(saved: dict) -> None:
    path, expected = saved["plain"]
    (losses,) = run_ranks(_resume_plain, path, world_size=1)
    assert_close_rel(losses, expected, rtol=1e-6, atol=1e-7, what="PP=2 -> nn.Sequential")


def _load_mismatched(path: str) -> str:
    engine = _engine(2, "tied")
    with pytest.raises(Exception, match="does not match") as info:
        engine.load_checkpoint(path)
    return str(info.value)


def test_strict_loading_checks_the_whole_pipeline(saved: dict) -> None:
    path, _ = saved["plain"]
    for message in run_ranks(_load_mismatched, path):
        assert "does not match the pipeline model" in message and "load_module_strict=False" in message
