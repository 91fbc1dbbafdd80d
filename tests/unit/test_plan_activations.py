"""The planner's activation formula (``shardwise/plan/activations.py``) against what autograd really keeps.

A single-process ``Llama`` runs one training forward on the CPU; every tensor autograd saves for backward is
collected through ``saved_tensors_hooks`` (deduplicated by storage, parameters and buffers left out), and so are
the inputs that activation checkpointing stashes (``checkpointing.memory_stats()``). The formula must give the
same number of bytes, exactly, for 16- and 32-bit models, with and
without grouped-query attention, with and without checkpointing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from shardwise.activation_checkpointing import memory_stats
from shardwise.models.llama import Llama, LlamaConfig
from shardwise.plan.activations import ActivationSetup, micro_batch_activations

CFG = LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, ffn_hidden=96, max_seq_len=32)
BATCH, SEQ = 2, 32


def _saved_bytes(model: Llama, dtype: torch.dtype) -> int:
    """Bytes of every distinct storage autograd (or a checkpoint) keeps after one forward with targets."""
    static = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in static:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=g)
    inputs, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(inputs, targets)
        stashed = memory_stats().get("cpu", 0)
    total = sum(seen.values()) + stashed
    loss.backward()  # the graph is complete and usable
    return total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_formula_equals_the_tensors_autograd_saves(dtype: torch.dtype, kv_heads: int, checkpointing: bool) -> None:
    cfg = replace(CFG, n_kv_heads=kv_heads, checkpoint_activations=checkpointing)
    torch.manual_seed(0)
    model = Llama(cfg).to(dtype)
    measured = _saved_bytes(model, dtype)
    setup = ActivationSetup(dtype_bytes=torch.empty((), dtype=dtype).element_size(), checkpointing=checkpointing)
    est = micro_batch_activations(cfg, setup, BATCH, SEQ, cfg.n_layers, has_embedding=True, has_head=True,
                                  receives_boundary=False)
    assert est.resident == measured, f"formula {est.resident} B vs autograd {measured} B ({est.as_dict()})"


def test_checkpointing_keeps_only_block_inputs_and_recomputes_one_block() -> None:
    setup = ActivationSetup(dtype_bytes=2)
    kw = {"has_embedding": False, "has_head": False, "receives_boundary": False}
    plain = micro_batch_activations(CFG, setup, BATCH, SEQ, 4, **kw)
    ckpt = micro_batch_activations(CFG, replace(setup, checkpointing=True), BATCH, SEQ, 4, **kw)
    assert ckpt.layers == 4 * BATCH * SEQ * CFG.dim * 2  # one bf16 hidden state per block
    assert ckpt.recompute == plain.per_layer and plain.recompute == 0
    offloaded = micro_batch_activations(CFG, replace(setup, checkpointing=True, cpu_checkpointing=True), BATCH, SEQ,
                                        4, **kw)
    assert offloaded.layers == 0


def test_tensor_and_sequence_parallel_divide_what_they_split() -> None:
    kw = {"has_embedding": False, "has_head": False, "receives_boundary": False}
    one = micro_batch_activations(CFG, ActivationSetup(dtype_bytes=2), BATCH, SEQ, 1, **kw)
    two = micro_batch_activations(CFG, ActivationSetup(dtype_bytes=2, tp=2), BATCH, SEQ, 1, **kw)
    sp = micro_batch_activations(CFG, ActivationSetup(dtype_bytes=2, tp=2, sequence_parallel=True), BATCH, SEQ, 1,
                                 **kw)
    assert one.per_layer > two.per_layer > sp.per_layer > one.per_layer / 2 - CFG.dim * BATCH * SEQ * 8
    with pytest.raises(ValueError, match="does not divide"):
        micro_batch_activations(CFG, ActivationSetup(ulysses=3), BATCH, SEQ, 1, **kw)
