"""Random-LTD, single process: the kept-token schedule against hand-computed values, and the wrapped layer against
an explicit gather -> layer -> scatter (values and gradients), for both hidden-state orders and mask kinds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardwise.config import load_config
from shardwise.data import RandomLayerTokenDrop, RandomLTDScheduler, remove_random_ltd_state_dict
from shardwise.data.random_ltd import encoder_masks, layer_number


def _ltd(**over) -> object:
    block = {"enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 2, "random_ltd_layer_id": [1, 2],
             "model_mask_name": "mask", "model_type": "decoder", "hidden_state_order": "batch_seq_dim",
             "random_ltd_schedule": {"min_value": 4, "max_value": 16, "schedule_type": "fixed_linear",
                                     "schedule_config": {"require_steps": 6, "seq_per_step": 4}}, **over}
    cfg = load_config({"train_batch_size": 8, "data_efficiency": {"data_routing": {"random_ltd": block}}}, log=False)
    return cfg.data_efficiency.data_routing.random_ltd


def test_schedule_and_consumed_tokens_match_hand_computed_values():
    sched = RandomLTDScheduler(_ltd(), global_batch_size=8)
    kept, consumed = [], []
    for step in range(9):
        sched.update_seq(step)
        sched.update_seq(step)  # a second forward in the same step (gradient accumulation) counts once
        kept.append(sched.get_current_seq())
        consumed.append(sched.state["consumed_layer_tokens"])
    # floor(s/6 * 12 + 4) rounded down to a multiple of 4: 4, 6, 8, 10, 12, 14, 16 -> 4, 4, 8, 8, 12, 12, 16
    assert kept == [4, 4, 8, 8, 12, 12, 16, 16, 16]
    # per step: batch 8 x (kept x 2 dropping layers + 16 x 2 full layers)
    per_step = [8 * (k * 2 + 16 * 2) for k in kept]
    assert consumed == [sum(per_step[: i + 1]) for i in range(9)]
    fresh = RandomLTDScheduler(_ltd(), global_batch_size=8)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.get_current_seq() == 16 and fresh.state["consumed_layer_tokens"] == consumed[-1]


class Mix(nn.Module):
    """A layer whose output depends on every kept token (so dropping changes the result) and on the mask."""

    def __init__(self, width: int = 6, batch_first: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        x = x if self.batch_first else x.transpose(0, 1)
        mixed = x.cumsum(dim=1) if mask is None else torch.einsum("bst,btd->bsd", mask[:, 0].to(x.dtype), x)
        out = torch.tanh(self.lin(mixed))
        return (out if self.batch_first else out.transpose(0, 1)), 7


def _wrapped(order: str, model_type: str, reserved: int) -> tuple[RandomLayerTokenDrop, RandomLTDScheduler]:
    cfg = _ltd(hidden_state_order=order, model_type=model_type, random_ltd_layer_num=1, random_ltd_layer_id=[0])
    sched = RandomLTDScheduler(cfg, global_batch_size=4)
    sched.set_current_seq(reserved)
    torch.manual_seed(0)
    layer = RandomLayerTokenDrop(Mix(batch_first=order == "batch_seq_dim")).double()
    layer.init_config(cfg, sched, 0)
    return layer, sched


@pytest.mark.parametrize("order", ["batch_seq_dim", "seq_batch_dim"])
@pytest.mark.parametrize("model_type", ["decoder", "encoder"])
def test_layer_equals_explicit_gather_layer_scatter(order: str, model_type: str):
    layer, sched = _wrapped(order, model_type, reserved=5)
    b, s = 3, 9
    x = torch.randn(b, s, 6, dtype=torch.float64)
    mask = torch.tril(torch.ones(s, s, dtype=torch.float64)).expand(b, 1, s, s).clone()
    mask[1, 0, 4, 2] = 0.0  # make sample 1's mask differ, so a mask mix-up shows
    inp = (x.clone() if order == "batch_seq_dim" else x.transpose(0, 1).contiguous()).requires_grad_(True)
    out, extra = layer(inp, mask=mask)
    got = out if order == "batch_seq_dim" else out.transpose(0, 1)
    idx = sched.state["sample_idx"][0]  # [batch, reserved], sorted, distinct
    assert idx.shape == (b, 5) and all(torch.equal(r, r.unique()) for r in idx)
    # the explicit computation, sample by sample
    ref_in = x.clone().requires_grad_(True)
    inner = Mix().double()
    inner.load_state_dict(layer.random_ltd_layer.state_dict())
    rows = []
    for i in range(b):
        keep = idx[i]
        m = mask[i:i + 1, :, :5, :5] if model_type == "decoder" else mask[i:i + 1][:, :, keep][:, :, :, keep]
        part = inner(ref_in[i:i + 1, keep], mask=m)[0]
        rows.append(ref_in[i:i + 1].index_copy(1, keep, part))
    ref = torch.cat(rows)
    assert extra == 7
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(ref)
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    grad = inp.grad if order == "batch_seq_dim" else inp.grad.transpose(0, 1)
    torch.testing.assert_close(grad, ref_in.grad, rtol=1e-12, atol=1e-12)


def test_no_dropping_in_eval_or_when_everything_is_kept():
    layer, sched = _wrapped("batch_seq_dim", "decoder", reserved=5)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    plain = layer.random_ltd_layer(x)[0].detach()
    layer.eval()
    torch.testing.assert_close(layer(x)[0], plain)
    layer.train()
    sched.set_current_seq(9)
    torch.testing.assert_close(layer(x)[0], plain)
    sched.set_current_seq(5)
    assert not torch.allclose(layer(x)[0], plain)


def test_encoder_masks_gather_rows_and_columns():
    mask = torch.arange(2 * 1 * 4 * 4).reshape(2, 1, 4, 4)
    idx = torch.tensor([[[0, 2], [1, 3]]])
    (m,) = encoder_masks(mask, idx)
    assert m[0, 0].tolist() == [[0, 2], [8, 10]] and m[1, 0].tolist() == [[21, 23], [29, 31]]


def test_names_and_state_dict_helpers():
    assert [layer_number(n, p) for p, n in enumerate(["h.3", "blocks.10.attn", "encoder"])] == [3, 10, 2]
    sd = {"h.0.random_ltd_layer.lin.weight": 1, "head.weight": 2}
    assert dict(remove_random_ltd_state_dict(sd)) == {"h.0.lin.weight": 1, "head.weight": 2}
