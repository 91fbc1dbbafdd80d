"""Offload to pinned host memory on CUDA: the optimizer (ZeRO-2 and -3) and the ZeRO-3 parameter shards.

Each configuration runs in its own process, so ``memory_allocated`` (bytes of live tensors on the device, exact on
CUDA) is compared between runs of the same model and data. The stated behaviour: after 3 steps, the device holds
less with offload than without, by at least half of what the offloaded tensors occupy on the device without
offload (master weights + Adam moments: 12 bytes per element; bf16 parameter shards: 2 bytes per element); the
offloaded tensors are host tensors in page-locked memory; and training gives the losses of the run without
offload (1e-2 relative: host and device Adam round differently, bf16 weights).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shardwise
from shardwise.accelerator import get_accelerator
from tests.gpu.harness import run_gpu

WIDTH, LAYERS = 1024, 8  # 8.4M parameters
PARAMS = LAYERS * (WIDTH * WIDTH + WIDTH)
STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(LAYERS)])


def _config(stage: int, optimizer: bool, params: bool) -> dict:
    zero: dict = {"stage": stage, "stage3_param_persistence_threshold": 0}
    if optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": zero}


def _host_tensors(engine) -> dict[str, list[torch.Tensor]]:
    groups = engine.strategy.optimizer.live_groups
    out = {"master": [g.master for g in groups if g.master is not None]}
    stores = [g.store.tensor for g in groups if hasattr(getattr(g, "store", None), "tensor")]
    if stores:
        out["shards"] = stores
    return out


def _run(stage: int, optimizer: bool, params: bool) -> dict:
    acc = get_accelerator()
    engine, _, _, _ = shardwise.initialize(model=_model(), config=_config(stage, optimizer, params))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x = torch.randn(4, WIDTH, generator=g).to(engine.device, torch.bfloat16)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    acc.synchronize()
    acc.empty_cache()
    where = {k: [(t.device.type, acc.is_pinned(t)) for t in ts] for k, ts in _host_tensors(engine).items()}
    return {"losses": losses, "allocated": acc.memory_allocated(), "breakdown": engine.memory_breakdown(),
            "where": where}


def _report(what: str, base: dict, off: dict, expected: int) -> float:
    drop = base["allocated"] - off["allocated"]
    print(f"{what}: device memory after {STEPS} steps {base['allocated'] / 2**20:.1f} -> "
          f"{off['allocated'] / 2**20:.1f} MiB (drop {drop / 2**20:.1f} MiB; offloaded tensors "
          f"{expected / 2**20:.1f} MiB); breakdown {off['breakdown']}")
    return drop


@pytest.mark.cuda_only
@pytest.mark.parametrize("stage", [2, 3])
def test_optimizer_offload_frees_device_memory(stage: int) -> None:
    (base,) = run_gpu(_run, stage, False, False)
    (off,) = run_gpu(_run, stage, True, False)
    expected = base["breakdown"]["master_weights"] + base["breakdown"]["optimizer_states"]
    assert expected >= 12 * PARAMS  # fp32 master + two fp32 Adam moments of every element
    drop = _report(f"stage {stage} offload_optimizer", base, off, expected)
    assert off["allocated"] < base["allocated"]
    assert drop >= 0.5 * expected
    assert off["where"]["master"] and all(w == ("cpu", True) for w in off["where"]["master"]), off["where"]
    assert all(w[0] == "cuda" for w in base["where"]["master"]), base["where"]
    torch.testing.assert_close(torch.tensor(off["losses"]), torch.tensor(base["losses"]), rtol=1e-2, atol=0)


@pytest.mark.cuda_only
def test_zero3_param_offload_frees_device_memory() -> None:
    (base,) = run_gpu(_run, 3, True, False)
    (off,) = run_gpu(_run, 3, True, True)
    expected = 2 * PARAMS  # bf16 shards of every parameter (one rank: the whole model)
    drop = _report("stage 3 offload_param", base, off, expected)
    assert off["allocated"] < base["allocated"]
    assert drop >= 0.5 * expected
    assert off["where"]["shards"] and all(w == ("cpu", True) for w in off["where"]["shards"]), off["where"]
    assert all(w[0] == "cuda" for w in base["where"]["shards"]), base["where"]
    torch.testing.assert_close(torch.tensor(off["losses"]), torch.tensor(base["losses"]), rtol=1e-2, atol=0)
