"""ZeRO-3 releases gathered weights after a module's forward even though autograd saved views of them (``F.linear``
saves ``weight.t()``): between forward and backward no released unit's full buffer stays alive, and training still
matches plain PyTorch."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

import shardwise
from shardwise.zero.unit import ParamUnit
from tests.dist import run_ranks

LAYERS, WIDTH = 6, 64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(LAYERS)])


def _batch(step: int) -> torch.Tensor:
    return torch.randn(2, 3, WIDTH, generator=torch.Generator().manual_seed(step))  # 3-D: linear saves weight.t()


def _train(zero3: bool) -> dict:
    model = _model()
    buffers: list[weakref.ref] = []
    alive_after_forward = []
    if zero3:
        release = ParamUnit.release

        def tracked(self: ParamUnit, force: bool = False) -> None:
            if self.full is not None and not self.persistent:
                buffers.append(weakref.ref(self.full))
            release(self, force)

        ParamUnit.release = tracked
        cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
               "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                     "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}}
        engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
        step_fn = engine
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(3):
        x = _batch(step)
        if zero3:
            buffers.clear()
            loss = (step_fn(x) - 1).pow(2).mean()
            gc.collect()
            alive_after_forward.append(sum(r() is not None for r in buffers))
            engine.backward(loss)
            engine.step()
        else:
            loss = (model(x) - 1).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "alive": alive_after_forward, "released": len(buffers)}


def test_released_weights_are_not_held_by_autograd() -> None:
    reference = _train(False)
    results = run_ranks(_train, True, world_size=2)
    for r in results:
        assert r["alive"] == [0, 0, 0], r  # the full buffers of released units were freed before backward
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
