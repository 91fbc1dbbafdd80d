"""fp32 without optimizer offload: ZeRO-1/2 on one data-parallel rank step the flat parameter buffer itself, and
ZeRO-3 steps its shards (no master copy); training, the memory report, the estimate and a checkpoint round trip
are unchanged. Every rank trains on the same batch, so the averaged gradient is the single-process one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import shardwise
from shardwise.zero.estimate import estimate_model_states
from tests.dist import run_ranks


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)


def _train(stage: int, tmp: str) -> dict:
    model = _model()
    reference = copy.deepcopy(model)
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}}
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    for step in range(4):
        x, y = _batch(step)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        ref_loss = nn.functional.mse_loss(reference(x), y)
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(engine.module.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    if stage == 3:
        aliased = [g.master_is_shards for g in engine.strategy.groups if g is not None]
    else:
        aliased = [g.master_is_flat for g in engine.strategy.optimizer.live_groups]
    breakdown = engine.memory_breakdown()
    engine.save_checkpoint(tmp, tag="t")
    saved = [p.detach().clone() for p in engine.module.parameters()]
    x, y = _batch(9)
    engine.backward(nn.functional.mse_loss(engine(x), y))
    engine.step()  # the weights move on ...
    engine.load_checkpoint(tmp, tag="t")  # ... and come back with the master (the same buffer)
    for p, s in zip(engine.module.parameters(), saved):
        torch.testing.assert_close(p, s, rtol=0, atol=0)
    return {"aliased": aliased, "breakdown": breakdown,
            "params": sum(p.numel() for p in engine.module.parameters())}


@pytest.mark.parametrize("stage,world", [(1, 1), (2, 1), (3, 2)])
def test_fp32_steps_the_parameters_own_storage(stage, world, tmp_path):
    for res in run_ranks(_train, stage, str(tmp_path), world_size=world):
        assert res["aliased"] and all(res["aliased"])
        assert res["breakdown"]["master_weights"] == 0
    assert estimate_model_states(res["params"], world, stage, precision="fp32").master_weights == 0


def test_the_master_stays_a_copy_where_it_must():
    """Two data-parallel ranks at stages 1-2 (the partition is spread over buckets), 16-bit models and optimizer
    offload keep a separate fp32 master."""
    assert estimate_model_states(1000, 2, 2, precision="fp32").master_weights == 4 * 1000 // 2
    assert estimate_model_states(1000, 2, 3, precision="bf16").master_weights == 4 * 1000 // 2
    offloaded = estimate_model_states(1000, 2, 3, precision="fp32", offload_optimizer=True)
    assert offloaded.master_weights == 0 and offloaded.host == (4 + 8) * 1000 // 2  # the fp32 master is on the host
