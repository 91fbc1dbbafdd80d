"""Activation checkpointing with ZeRO-3: recomputation re-gathers the block's parameters; results stay exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardwise
from shardwise import checkpointing
from shardwise.zero import GatheredParameters
from tests.dist import run_ranks
from tests.models import TINY_GPT, assert_close_rel, rank_batch, tiny_transformer

STEPS = 3


class CheckpointedGPT(nn.Module):
    """The tiny GPT with every block run through activation checkpointing."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.gpt = tiny_transformer(seed=0)
        self.reentrant = reentrant

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        g = self.gpt
        x = g.wte(idx) + g.wpe(torch.arange(idx.shape[1]))
        run = checkpointing.checkpoint if self.reentrant else checkpointing.non_reentrant_checkpoint
        for block in g.blocks:
            x = run(block, x)
        logits = g.head(g.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def _train(reentrant: bool | None) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = CheckpointedGPT(bool(reentrant)) if reentrant is not None else None
    if model is None:  # reference layout: no checkpointing, same weights
        model = CheckpointedGPT(True)
        model.forward = lambda idx, targets: model.gpt(idx, targets)  # type: ignore[method-assign]
    model.double()
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                 "stage3_module_granularity_threshold": 0}}
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
    losses = []
    for step in range(STEPS):
        x, y = rank_batch(step, engine.topology.coord("dp"), kind="gpt", cfg=TINY_GPT)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with GatheredParameters(list(engine.module.parameters())):
        return losses, {k: v.clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_blocks_under_zero3_match_the_plain_run(reentrant: bool) -> None:
    """In float64 the checkpointed run must equal the uncheckpointed one to rounding."""
    plain = run_ranks(_train, None, world_size=2)
    ckpt = run_ranks(_train, reentrant, world_size=2)
    for (l1, s1), (l2, s2) in zip(plain, ckpt):
        assert_close_rel(l2, l1, rtol=1e-12, atol=0, what="losses")
        for k in s1:
            assert_close_rel(s2[k], s1[k], rtol=1e-10, atol=1e-14, what=k)
