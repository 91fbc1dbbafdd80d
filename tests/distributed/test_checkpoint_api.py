"""The DeepSpeed-shaped checkpoint API on real ranks: client_state, frozen parameters and buffers, strictness,
``load_module_only``, ``save_16bit_model`` (stages 2 and 3), and consolidation (``shardwise-to-fp32``) against the
model's own state dict."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import shardwise
from shardwise.checkpoint.consolidate import (
    get_fp32_state_dict_from_zero_checkpoint,
    load_state_dict_from_zero_checkpoint,
    main,
)
from shardwise.checkpoint.errors import CheckpointError
from tests.dist import run_ranks
from tests.models import rank_batch, tiny_transformer


class _Net(nn.Module):
    """A frozen input projection, a BatchNorm (float and int64 buffers), a trainable head."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)
        self.embed.weight.requires_grad_(False)
        if extra:
            self.extra = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.embed(x))))


def _engine(stage: int | str, model: nn.Module | None = None, precision: str = "fp32", gather16: bool = True):
    """``stage`` "3p": ZeRO-3 with its default persistence (these small layers stay gathered)."""
    zero = {"stage": 3 if stage == "3p" else stage, "reduce_bucket_size": 100,
            "stage3_gather_16bit_weights_on_model_save": gather16}
    if stage != "3p":
        zero["stage3_param_persistence_threshold"] = 0
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "zero_optimization": zero}
    if precision != "fp32":
        cfg[precision] = {"enabled": True}
    engine, _, _, _ = shardwise.initialize(model=model if model is not None else _Net(), config=cfg)
    return engine


def _train(engine, steps: int = 2) -> None:
    rank = engine.topology.coord("dp")
    for step in range(steps):
        x, y = rank_batch(step, rank)
        out = engine(x.to(next(engine.module.parameters()).dtype))
        engine.backward(torch.nn.functional.mse_loss(out.float(), y))
        engine.step()


def _state(engine) -> dict[str, torch.Tensor]:
    with shardwise.zero.GatheredParameters(list(engine.module.parameters())):
        return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


CLIENT = {"epoch": 3, "loss": float("inf"), "pair": (1, "a"), "by_id": {7: [1.5, None]}, "t": torch.arange(4)}


def _save(save_dir: str, stage: int, exclude_frozen: bool) -> dict:
    engine = _engine(stage)
    _train(engine)
    with shardwise.zero.GatheredParameters([engine.module.embed.weight], modifier_rank=0), torch.no_grad():
        engine.module.embed.weight.mul_(2)  # the frozen weight now differs from a freshly built model's
    engine.save_checkpoint(save_dir, client_state=CLIENT, exclude_frozen_parameters=exclude_frozen)
    return _state(engine)


def _load(save_dir: str, stage: int, kwargs: dict) -> dict:
    engine = _engine(stage, _Net(extra=kwargs.pop("extra", False)))
    try:
        _, client = engine.load_checkpoint(save_dir, **kwargs)
    except CheckpointError as exc:
        return {"error": str(exc)}
    return {"client": client, "state": _state(engine), "steps": engine.global_steps,
            "optimizer_state": len(engine.optimizer.basic.state)}


@pytest.mark.parametrize("stage, load_stage", [(2, 1), (3, 1), (1, "3p")])
def test_client_state_frozen_weights_and_buffers_round_trip(stage: int, load_stage: int | str, tmp_path) -> None:
    saved = run_ranks(_save, str(tmp_path), stage, False)
    loaded = run_ranks(_load, str(tmp_path), load_stage, {})  # into another stage
    for rank in range(2):
        client = loaded[rank]["client"]
        assert torch.equal(client.pop("t"), CLIENT["t"]) and client == {k: v for k, v in CLIENT.items() if k != "t"}
        for name, value in saved[0].items():  # buffers are rank 0's (as DeepSpeed saves the first replica)
            assert torch.equal(loaded[rank]["state"][name], value), name
    assert loaded[0]["steps"] == 2 and loaded[0]["optimizer_state"] > 0


def test_exclude_frozen_strictness_and_module_only(tmp_path) -> None:
    fresh = _Net().state_dict()
    saved = run_ranks(_save, str(tmp_path), 2, True)
    manifest = json.loads((tmp_path / "global_step2" / "manifest.json").read_text())
    assert manifest["excluded"] == ["embed.weight"] and "embed.weight" not in manifest["tensors"]
    loaded = run_ranks(_load, str(tmp_path), 2, {})
    assert torch.equal(loaded[0]["state"]["embed.weight"], fresh["embed.weight"])  # excluded: left as built
    assert torch.equal(loaded[0]["state"]["head.weight"], saved[0]["head.weight"])
    mismatch = run_ranks(_load, str(tmp_path), 2, {"extra": True})
    assert all("missing 2 tensor(s) ['extra.weight', 'extra.bias']" in r["error"] for r in mismatch), mismatch[0]
    lenient = run_ranks(_load, str(tmp_path), 2, {"extra": True, "load_module_strict": False})
    assert torch.equal(lenient[0]["state"]["head.weight"], saved[0]["head.weight"])
    module_only = run_ranks(_load, str(tmp_path), 2, {"load_module_only": True})
    assert module_only[0]["steps"] == 0 and module_only[0]["optimizer_state"] == 0
    assert torch.equal(module_only[1]["state"]["head.bias"], saved[0]["head.bias"])


def _bad_client_state(save_dir: str) -> str:
    engine = _engine(2)
    try:
        engine.save_checkpoint(save_dir, client_state={"ok": 1, "bad": object()})
    except CheckpointError as exc:
        return str(exc)
    return "no error"


def test_non_json_client_state_is_refused_on_every_rank(tmp_path) -> None:
    errors = run_ranks(_bad_client_state, str(tmp_path))
    assert all("client_state['bad'] is a builtins.object" in e for e in errors), errors


def _save_16bit(save_dir: str, stage: int, gather16: bool = True) -> tuple[dict, bool]:
    engine = _engine(stage, tiny_transformer(seed=0), precision="bf16", gather16=gather16)
    rank = engine.topology.coord("dp")
    for step in range(2):
        engine.backward(engine(*rank_batch(step, rank, kind="gpt", batch=2)))
        engine.step()
    saved = engine.save_16bit_model(save_dir, "model.safetensors")
    engine.save_16bit_model(save_dir)
    return _state(engine), saved


@pytest.mark.parametrize("stage", [2, 3])
def test_save_16bit_model_writes_the_full_model_dtype_weights(stage: int, tmp_path) -> None:
    expected, saved = run_ranks(_save_16bit, str(tmp_path), stage)[0]
    assert saved is True
    as_safetensors = load_file(str(tmp_path / "model.safetensors"))
    as_torch = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert as_safetensors.keys() == as_torch.keys() == expected.keys()  # tied head.weight included
    for name, value in expected.items():
        assert value.dtype == torch.bfloat16 or not value.is_floating_point()
        assert torch.equal(as_safetensors[name], value) and torch.equal(as_torch[name], value), name
    if stage == 3:  # without stage3_gather_16bit_weights_on_model_save DeepSpeed saves nothing and returns False
        _, saved = run_ranks(_save_16bit, str(tmp_path / "no"), 3, False)[0]
        assert saved is False and not (tmp_path / "no").exists()


def _save_gpt(save_dir: str) -> dict:
    engine = _engine(2, tiny_transformer(seed=0))
    rank = engine.topology.coord("dp")
    for step in range(2):
        engine.backward(engine(*rank_batch(step, rank, kind="gpt", batch=2)))
        engine.step()
    engine.save_checkpoint(save_dir)
    return _state(engine)


def test_to_fp32_output_equals_the_model_state_dict(tmp_path) -> None:
    expected = run_ranks(_save_gpt, str(tmp_path / "ckpt"))[0]
    assert main([str(tmp_path / "ckpt"), str(tmp_path / "one")]) == 0
    single = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert main([str(tmp_path / "ckpt"), str(tmp_path / "many"), "--max_shard_size", "20KB"]) == 0
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    many = {k: v for s in shards for k, v in load_file(str(tmp_path / "many" / s)).items()}
    in_memory = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"))
    assert single.keys() == many.keys() == in_memory.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(single[name], value) and torch.equal(many[name], value), name
        assert torch.equal(in_memory[name], value), name
    model = load_state_dict_from_zero_checkpoint(tiny_transformer(seed=5), str(tmp_path / "ckpt"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
