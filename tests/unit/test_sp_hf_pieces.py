"""Ulysses-for-Hugging-Face pieces on one process: the full-sequence masks against transformers' own mask builders,
the head plan, and the tiled loss against the plain loss (values and gradients, with an HF model's lm_head too)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers import masking_utils as mu

from shardwise.sp import TiledFusedLogitsLoss, tiled_cross_entropy_sum
from shardwise.sp.hf_masks import FullSequence, eager_mask, sdpa_mask
from shardwise.sp.hf_ulysses import plan_heads

S = 12


def _hf_mask(kind: str, padding: torch.Tensor | None, positions: torch.Tensor | None, window: int | None):
    """What transformers builds for the whole sequence (create_causal_mask / the sliding-window variant)."""
    cfg = LlamaConfig(hidden_size=8, num_attention_heads=1, sliding_window=window)
    cfg._attn_implementation = kind
    embeds = torch.zeros(2, S, 8)
    build = mu.create_sliding_window_causal_mask if window else mu.create_causal_mask
    return build(config=cfg, inputs_embeds=embeds, attention_mask=padding, cache=None, position_ids=positions)


CASES = {
    "causal": (None, None, None),
    "all-ones-mask": (torch.ones(2, S, dtype=torch.long), None, None),
    "left-padding": (torch.tensor([[0] * 3 + [1] * (S - 3), [1] * S]), None, None),
    "right-padding": (torch.tensor([[1] * (S - 4) + [0] * 4, [1] * S]), None, None),
    "packed": (None, torch.tensor([list(range(5)) + list(range(7)), list(range(S))]), None),
    "window-short": (None, None, 5),
    "window-long": (None, None, S + 3),
    "window-padding": (torch.tensor([[0] * 2 + [1] * (S - 2), [1] * S]), None, 4),
}


@pytest.mark.parametrize("kind", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_full_sequence_masks_equal_transformers(kind, case):
    padding, positions, window = CASES[case]
    ref = _hf_mask(kind, padding, positions, window)
    full_pos = positions if positions is not None else torch.arange(S).expand(2, -1)
    pad = None if padding is None or bool(padding.bool().all()) else padding.bool()
    seq = FullSequence(full_pos, pad, mask_given=padding is not None)
    if kind == "sdpa":
        mine = sdpa_mask(seq, S, window, torch.device("cpu"))
    else:
        mine = eager_mask(seq, S, window, torch.device("cpu"), torch.float32)
    if ref is None:
        assert mine is None
        return
    assert mine is not None
    torch.testing.assert_close(mine.expand_as(ref), ref, rtol=0, atol=0)


@pytest.mark.parametrize("heads,kv,sp", [(4, 2, 2), (4, 1, 2), (8, 2, 4), (6, 6, 4), (12, 6, 4), (6, 2, 4), (3, 3, 2)])
def test_head_plan_keeps_every_query_with_its_key_value_head(heads, kv, sp):
    plan = plan_heads(heads, kv, sp)
    assert sum(plan.q_sizes) == heads and len(plan.q_sizes) == sp
    assert sum(plan.kv_sizes) == kv * plan.kv_repeat
    q0 = k0 = 0
    for qn, kn in zip(plan.q_sizes, plan.kv_sizes):
        assert qn == kn * plan.local_groups
        for local_q in range(qn):
            expanded_kv = k0 + local_q // plan.local_groups  # the head after repeat_interleave
            assert expanded_kv // plan.kv_repeat == (q0 + local_q) // (heads // kv)  # the original pairing
        q0, k0 = q0 + qn, k0 + kn


def test_head_plan_refuses_query_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        plan_heads(6, 4, 2)


# -- tiled loss ----------------------------------------------------------------------------------------------------
def _ce_sum(head, x, y):
    return F.cross_entropy(head(x), y, ignore_index=-100, reduction="sum")


def _ce_mean_masked(head, x, y, m):
    per = F.cross_entropy(head(x), y, reduction="none")
    return (per * m).sum() / m.sum().clamp(min=1)


@pytest.mark.parametrize("shards", [1, 3, 7, 40])
def test_tiled_loss_equals_plain_loss_and_gradients(shards):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, dtype=torch.float64)
    x = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (3, 11))
    y[0, :4] = -100
    y[2, -3:] = -100
    plain = F.cross_entropy(head(x).reshape(-1, 50), y.reshape(-1), ignore_index=-100, reduction="sum")
    gx, gw, gb = torch.autograd.grad(plain * 0.7, [x, head.weight, head.bias])
    tiled = TiledFusedLogitsLoss.apply(_ce_sum, head, x, y, None, shards, None, "sum")
    torch.testing.assert_close(tiled, plain)
    mx, mw, mb = torch.autograd.grad(tiled * 0.7, [x, head.weight, head.bias])
    for mine, ref in ((mx, gx), (mw, gw), (mb, gb)):
        torch.testing.assert_close(mine, ref)


def test_tiled_loss_mean_reduction_with_a_mask_averages_the_chunks():
    torch.manual_seed(1)
    head = nn.Linear(8, 20, bias=False, dtype=torch.float64)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 20, (2, 6))
    m = (torch.rand(2, 6) > 0.3).double()
    chunks = list(zip(x.reshape(12, 8).chunk(4), y.reshape(12).chunk(4), m.reshape(12).chunk(4)))
    plain = torch.stack([_ce_mean_masked(head, *c) for c in chunks]).mean()
    gx, gw = torch.autograd.grad(plain, [x, head.weight])
    tiled = TiledFusedLogitsLoss.apply(_ce_mean_masked, head, x, y, m, 4, [head.weight], "mean")
    torch.testing.assert_close(tiled, plain)
    for mine, ref in zip(torch.autograd.grad(tiled, [x, head.weight]), (gx, gw)):
        torch.testing.assert_close(mine, ref)


def test_tiled_loss_of_an_hf_model_equals_its_own_loss():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)  # fp32: transformers' loss computes in fp32 whatever the model's dtype
    ids = torch.randint(0, 64, (2, 16))
    labels = ids.clone()
    labels[1, :5] = -100
    ref = model(input_ids=ids, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    hidden = model.model(input_ids=ids).last_hidden_state
    loss_sum, count = tiled_cross_entropy_sum(hidden, model.lm_head, shift, shards=5)
    mine = loss_sum / count
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(mine, list(model.parameters())), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_tiled_loss_default_chunking_bounds_one_chunk_of_logits():
    from shardwise.sp.tiled_loss import num_shards

    assert num_shards(1000, 128_000, 256 * 2**20) == 2
    assert num_shards(10, 10) == 1


def test_tiled_loss_bad_arguments_are_named():
    head = nn.Linear(4, 5)
    x, y = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="output_reduction"):
        TiledFusedLogitsLoss.apply(_ce_sum, head, x, y, None, 2, None, "avg")
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        TiledFusedLogitsLoss.apply(_ce_sum, head, x, y[:, :2], None, 2, None, "sum")
