"""Engine-free pieces of checkpointing: the JSON+tensors codec, optimizer state materialisation and scalars, RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from shardwise.checkpoint import codec, optim_state, rng
from shardwise.checkpoint.errors import CheckpointError


def test_codec_round_trips_json_values_and_tensors() -> None:
    value = {"a": [1, 2.5, None, True], "t": (1, "x"), "n": {3: "int key", (1, 2): "tuple key"},
             "inf": float("-inf"), "x": torch.arange(3), "np": np.int64(4)}
    tensors: dict = {}
    encoded = codec.encode(value, tensors, "c.")
    assert list(tensors) == ["c.0"]
    import json

    decoded = codec.decode(json.loads(json.dumps(encoded)), tensors.__getitem__)
    assert torch.equal(decoded.pop("x"), value["x"])
    assert decoded == {k: v for k, v in value.items() if k != "x"} | {"np": 4}


@pytest.mark.parametrize("bad, message", [
    (object(), "client_state['k'] is a builtins.object"), (np.zeros(2), "numpy array"),
    ({"__tensor__": 1}, "reserved key '__tensor__'"), (lambda: 1, "is a builtins.function")])
def test_codec_refuses_what_would_need_pickle(bad, message) -> None:
    with pytest.raises(CheckpointError) as info:
        codec.encode({"k": bad}, {}, "c.")
    assert message in str(info.value)


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=0.1, weight_decay=0.1),  # L2 decay: a zero-grad step would move weights
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
], ids=["adam-l2", "adamw-fused", "sgd-momentum"])
def test_materialize_creates_state_without_changing_anything(make) -> None:
    params = _params()
    before = [p.detach().clone() for p in params]
    grads = [torch.ones_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt = make(params)
    optim_state.materialize(opt)
    assert optim_state.has_all_state(opt)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and all(p.grad is g for p, g in zip(params, grads))
    assert opt.param_groups[0]["lr"] == 0.1


def test_materialize_keeps_existing_state_and_scalars_round_trip() -> None:
    params = _params()
    opt = torch.optim.Adam(params, lr=0.1)
    params[0].grad = torch.ones(5)
    opt.step()  # only params[0] has state now
    saved_avg = opt.state[params[0]]["exp_avg"].clone()
    optim_state.materialize(opt)
    assert torch.equal(opt.state[params[0]]["exp_avg"], saved_avg) and opt.state[params[0]]["step"].item() == 1
    assert optim_state.has_all_state(opt)
    scalars = optim_state.group_scalars(opt)
    assert scalars == [{"state": True, "scalars": {"step": {"tensor": 1.0, "dtype": "float32", "dim": 0}}}]
    fresh = torch.optim.Adam(_params(), lr=0.1)
    optim_state.materialize(fresh)
    optim_state.set_group_scalars(fresh, scalars)
    assert all(s["step"].item() == 1 for s in fresh.state.values())
    optim_state.set_group_scalars(fresh, [{"state": False, "scalars": {}}])  # saved before the first step
    assert len(fresh.state) == 0
    with pytest.raises(CheckpointError, match="2 parameter group"):
        optim_state.set_group_scalars(fresh, scalars * 2)


def test_hyperparameters_restore_types() -> None:
    opt = torch.optim.Adam(_params(), lr=0.1, betas=(0.8, 0.9))
    tensors: dict = {}
    saved = [codec.encode({k: v for k, v in g.items() if k != "params"}, tensors, "h.") for g in opt.param_groups]
    other = torch.optim.Adam(_params(), lr=0.5)
    optim_state.set_hyperparameters(other, saved, tensors.__getitem__)
    assert other.param_groups[0]["lr"] == 0.1 and other.param_groups[0]["betas"] == (0.8, 0.9)


def test_rng_states_round_trip() -> None:
    tensors, meta = rng.capture()
    first = (random.random(), np.random.rand(), torch.rand(2))
    rng.restore(tensors.__getitem__, meta, tensors.__contains__)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_tensor_parallel_rng_streams_round_trip() -> None:
    tp_random = pytest.importorskip("shardwise.tp.random")
    tracker = tp_random.get_cuda_rng_tracker()
    before = tracker.get_states()
    try:
        if not tracker.has("ckpt-test-stream"):
            tracker.add("ckpt-test-stream", 987_654)
        tensors, meta = rng.capture()
        with tracker.fork("ckpt-test-stream"):
            first = torch.rand(3)
        rng.restore(tensors.__getitem__, meta, tensors.__contains__)
        with tracker.fork("ckpt-test-stream"):
            second = torch.rand(3)
        assert "ckpt-test-stream" in meta["tracker"] and torch.equal(first, second)
    finally:
        tracker.set_states(before)


def test_clone_tensors_for_torch_save_keeps_structure_and_drops_shared_storage() -> None:
    from collections import OrderedDict

    from shardwise.checkpoint.utils import clone_tensors_for_torch_save

    flat = torch.arange(100.0)
    state = OrderedDict(w=flat[:6].view(2, 3), rest=[flat[6:8], "tag", (flat[8:9],)])
    out = clone_tensors_for_torch_save(state)
    assert type(out) is OrderedDict and out["rest"][1] == "tag" and isinstance(out["rest"][2], tuple)
    assert torch.equal(out["w"], state["w"]) and out["w"].untyped_storage().nbytes() == 6 * 4
    assert out["w"].data_ptr() != flat.data_ptr()
