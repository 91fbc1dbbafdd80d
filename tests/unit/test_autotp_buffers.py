"""Tensors no checkpoint holds (rotary tables, causal masks, tensor attributes) get their constructor's values.

A model built on ``meta`` whose parameters and persistent buffers are then loaded must equal the model built for
real: same buffers, bit for bit, and the same logits. Which tensors are involved depends on the transformers
release (4.45 keeps GPT-J's ``embed_positions`` as a plain attribute and a rotary module per LLaMA layer; 5.x one
rotary module per model), so every auto-TP architecture is checked with whatever release is installed.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from shardwise.inference.buffers import finalize_buffers, parameters_on_meta
from shardwise.inference.loader import CheckpointError, iter_meta
from tests.inference_models import ARCHS, prompts, tiny_config, tiny_model


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_meta_model_gets_its_constructors_buffers(name):
    real = tiny_model(name)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(name)).eval()
    model.load_state_dict(real.state_dict(), assign=True, strict=False)  # what a checkpoint holds
    model.tie_weights()
    finalize_buffers(model, torch.device("cpu"))
    assert not list(iter_meta(model))
    real_buffers = dict(real.named_buffers())
    for key, buf in model.named_buffers():
        assert buf.dtype == real_buffers[key].dtype and torch.equal(buf, real_buffers[key]), key
    ids = prompts()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, real(ids).logits)


def test_parameters_on_meta_keeps_buffers_real_and_restores_registration():
    class WithTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    with parameters_on_meta():
        m = WithTable()
    assert m.proj.weight.is_meta and m.proj.bias.is_meta
    assert torch.equal(m.table, torch.arange(4.0))
    assert not WithTable().proj.weight.is_meta  # registration is back to normal outside


def test_a_buffer_nothing_can_compute_is_a_clear_error():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(2, 2))
    m.register_buffer("table", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(CheckpointError, match="build the model with real buffers"):
        finalize_buffers(m, torch.device("cpu"))
