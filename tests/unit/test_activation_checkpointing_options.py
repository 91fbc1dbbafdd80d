"""Activation checkpointing on one process: bitwise-identical gradients with dropout (RNG restoration, including
the tensor-parallel tracker), both variants, every option, configure() and its errors, profile and synchronize."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
from torch import nn

import shardwise as deepspeed
from shardwise.activation_checkpointing import settings as ac_settings
from shardwise.config import ConfigError, load_config
from shardwise.models import Llama, LlamaConfig
from shardwise.tp.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, dropout=0.2, max_seq_len=16)


@pytest.fixture(autouse=True)
def _fresh_settings():
    ac_settings._reset_for_tests()
    yield
    ac_settings._reset_for_tests()
    deepspeed.checkpointing.reset()


def _grads(checkpoint_fn=None, seed: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the plain Llama with dropout; blocks wrapped in ``checkpoint_fn`` if given."""
    torch.manual_seed(0)
    model = Llama(CFG).train()
    if checkpoint_fn is not None:
        for block in model.layers:
            block.forward = (lambda f: lambda *a: checkpoint_fn(f, *a))(block.forward)
    tokens = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, tp_rank=0)
    loss = model(tokens, tokens)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_bitwise(a, b) -> None:
    assert a[0] == b[0]
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


@pytest.mark.parametrize("variant", ["checkpoint", "non_reentrant_checkpoint"])
@pytest.mark.parametrize("options", [{}, {"checkpoint_in_cpu": True}, {"profile": True, "synchronize": True}],
                         ids=["plain", "cpu", "profile-sync"])
def test_gradients_are_bitwise_identical_with_dropout(variant, options):
    baseline = _grads()
    deepspeed.checkpointing.configure(None, **options)
    _assert_bitwise(_grads(getattr(deepspeed.checkpointing, variant)), baseline)
    other_seed = _grads(getattr(deepspeed.checkpointing, variant), seed=6)
    assert other_seed[0] != baseline[0]  # dropout is really on: another seed gives another loss


def _tracker_dropout(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    h = torch.nn.functional.dropout(lin(x), 0.5)  # default stream
    with get_cuda_rng_tracker().fork():  # model-parallel stream
        return torch.nn.functional.dropout(h, 0.5) * 2


@pytest.mark.parametrize("variant", ["checkpoint", "non_reentrant_checkpoint"])
def test_tracker_streams_are_restored_for_recomputation(variant):
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    results = []
    for fn in (None, getattr(deepspeed.checkpointing, variant)):
        model_parallel_cuda_manual_seed(3, tp_rank=1)
        lin.zero_grad()
        x.grad = None
        out = _tracker_dropout(x, lin) if fn is None else fn(_tracker_dropout, x, lin)
        out.square().sum().backward()
        results.append((out.detach(), lin.weight.grad.clone(), x.grad.clone(), torch.rand(3)))
    for a, b in zip(*results):
        assert torch.equal(a, b)  # incl. the generator state after backward: recomputation left no trace


def test_non_reentrant_needs_no_input_requiring_grad_and_takes_kwargs():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)  # no grad
    out = deepspeed.checkpointing.non_reentrant_checkpoint(lambda t, scale: lin(t) * scale, x, scale=torch.tensor(3.0))
    out.sum().backward()
    expected = torch.autograd.grad((lin(x) * 3).sum(), lin.weight)[0]
    torch.testing.assert_close(lin.weight.grad, expected)


def test_reentrant_keeps_output_structure_and_warns_without_grad_inputs(monkeypatch):
    from shardwise.activation_checkpointing import function

    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    out, none, n, ids = deepspeed.checkpointing.checkpoint(lambda t: (lin(t), None, 7, t.argmax(-1)), x)
    assert none is None and n == 7 and ids.dtype == torch.long and not ids.requires_grad
    out.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    monkeypatch.setattr(function, "_warned_no_grad_inputs", False)
    with pytest.warns(UserWarning, match="no input requires grad"):
        deepspeed.checkpointing.checkpoint(lin, torch.randn(2, 4))


def test_memory_stats_count_saved_inputs_until_backward():
    lin = nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)
    out = deepspeed.checkpointing.checkpoint(lin, x)
    assert deepspeed.checkpointing.memory_stats().get("cpu") == 8 * 16 * 4
    out.sum().backward()
    assert deepspeed.checkpointing.memory_stats().get("cpu", 0) == 0


def test_profile_logs_forward_and_recompute_times():
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("shardwise").addHandler(handler)
    try:
        deepspeed.checkpointing.configure(None, profile=True)
        lin = nn.Linear(4, 4)
        deepspeed.checkpointing.checkpoint(lin, torch.randn(2, 4, requires_grad=True)).sum().backward()
    finally:
        logging.getLogger("shardwise").removeHandler(handler)
    assert any("forward" in r and " ms" in r for r in records), records
    assert any("recompute+backward" in r for r in records), records


def test_synchronize_calls_the_accelerator_at_every_boundary(monkeypatch):
    acc = deepspeed.get_accelerator()
    calls = []
    monkeypatch.setattr(acc, "synchronize", lambda *a: calls.append(1))
    lin = nn.Linear(4, 4)
    deepspeed.checkpointing.checkpoint(lin, torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert calls == []
    deepspeed.checkpointing.configure(None, synchronize=True)
    deepspeed.checkpointing.checkpoint(lin, torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert len(calls) == 4  # start and end of the forward and of the backward


def test_configure_reads_the_config_section_and_keywords_override(tmp_path):
    assert not deepspeed.checkpointing.is_configured()
    section = {"partition_activations": True, "cpu_checkpointing": True, "contiguous_memory_optimization": True,
               "number_checkpoints": 4, "synchronize_checkpoint_boundary": True, "profile": True}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_batch_size": 8, "activation_checkpointing": section}))
    deepspeed.checkpointing.configure(None, deepspeed_config=str(path))
    s = deepspeed.checkpointing.get_settings()
    assert deepspeed.checkpointing.is_configured()
    assert (s.partition_activations, s.cpu_checkpointing, s.contiguous_memory_optimization, s.number_checkpoints,
            s.synchronize_checkpoint_boundary, s.profile) == (True, True, True, 4, True, True)
    deepspeed.checkpointing.configure(None, deepspeed_config={"activation_checkpointing": section},
                                      checkpoint_in_cpu=False, num_checkpoints=8)
    s = deepspeed.checkpointing.get_settings()
    assert (s.cpu_checkpointing, s.number_checkpoints, s.partition_activations) == (False, 8, True)
    loaded = load_config({"train_batch_size": 8, "activation_checkpointing": {"profile": True}}, dp_world_size=1)
    deepspeed.checkpointing.configure(None, deepspeed_config=loaded)  # an engine's loaded config works too
    s = deepspeed.checkpointing.get_settings()
    assert s.profile and not s.cpu_checkpointing


def test_configure_errors_name_the_fix():
    with pytest.raises(ValueError, match="needs partition_activations"):
        deepspeed.checkpointing.configure(None, contiguous_checkpointing=True, num_checkpoints=2)
    with pytest.raises(ValueError, match="needs number_checkpoints"):
        deepspeed.checkpointing.configure(None, partition_activations=True, contiguous_checkpointing=True)
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        deepspeed.checkpointing.configure(None, deepspeed_config={"activation_checkpointing": {"profil": True}})
    assert not deepspeed.checkpointing.is_configured()


def test_every_deepspeed_name_resolves():
    ds_ckpt = deepspeed.runtime.activation_checkpointing.checkpointing
    for name in ("checkpoint", "configure", "is_configured", "reset", "non_reentrant_checkpoint",
                 "get_cuda_rng_tracker", "model_parallel_cuda_manual_seed", "CheckpointFunction",
                 "model_parallel_reconfigure_tp_seed", "set_num_layers", "partition_activations_in_checkpoint"):
        assert getattr(ds_ckpt, name) is getattr(deepspeed.checkpointing, name), name


def test_tracker_errors_and_isolation():
    tracker = get_cuda_rng_tracker()
    model_parallel_cuda_manual_seed(1, tp_rank=0)
    with pytest.raises(ValueError, match="already"):
        tracker.add("other", 1 + 2718)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("missing"):
            pass
    before = torch.get_rng_state()
    with tracker.fork():
        torch.rand(10)
    assert torch.equal(torch.get_rng_state(), before)


def test_checkpointing_in_the_reference_model_is_a_config_switch():
    baseline = _grads()
    torch.manual_seed(0)
    model = Llama(replace(CFG, checkpoint_activations=True)).train()
    tokens = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    model_parallel_cuda_manual_seed(5, tp_rank=0)
    loss = model(tokens, tokens)
    loss.backward()
    _assert_bitwise((loss.item(), {n: p.grad for n, p in model.named_parameters()}), baseline)
