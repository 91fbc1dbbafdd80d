"""ZeRO-3 parameter and optimizer offload to NVMe (files): exact training, and the memory it gives back."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import shardwise
from shardwise.accelerator import get_accelerator
from tests.dist import run_ranks
from tests.distributed.test_zero3_features import _check, _train


def _nvme(path: str, params: bool, optimizer: bool) -> dict:
    zero: dict = {"stage3_param_persistence_threshold": 0}
    if params:
        zero["offload_param"] = {"device": "nvme", "nvme_path": path, "buffer_count": 2}
    if optimizer:
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": path}
        zero["sub_group_size"] = 50  # several sub-groups per step on the tiny model
    return zero


@pytest.mark.parametrize("params,optimizer", [(True, False), (False, True), (True, True)],
                         ids=["params", "optimizer", "both"])
def test_nvme_offload_trains_exactly(tmp_path, params: bool, optimizer: bool) -> None:
    results = run_ranks(_train, _nvme(str(tmp_path), params, optimizer), world_size=2)
    _check(results)
    assert any(name.endswith(".shards") for _, _, files in os.walk(tmp_path) for name in files)


WIDTH, LAYERS = 512, 16  # 4.2M parameters: 16.8 MB in fp32


def _resident_after_steps(path: str | None) -> dict[str, float]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(LAYERS)])
    zero: dict = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_module_granularity_threshold": 0}
    if path:
        zero.update(offload_param={"device": "nvme", "nvme_path": path},
                    offload_optimizer={"device": "nvme", "nvme_path": path}, sub_group_size=1 << 18)
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "zero_optimization": zero}
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
    del model
    acc = get_accelerator()
    for _ in range(3):
        x = torch.randn(2, WIDTH)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    acc.empty_cache()
    breakdown = engine.memory_breakdown()
    return {"rss_mb": acc.memory_allocated() / 2**20,
            "model_state_mb": sum(breakdown.values()) / 2**20}


def test_nvme_offload_gives_back_resident_memory(tmp_path) -> None:
    base = run_ranks(_resident_after_steps, None, world_size=2)
    nvme = run_ranks(_resident_after_steps, str(tmp_path), world_size=2)
    params = LAYERS * (WIDTH * WIDTH + WIDTH)
    # per rank, in memory: fp32 shards (4P/2, stepped in place: no separate master) + grads (4P/2) + Adam (8P/2)
    # = 8P bytes ...
    assert abs(base[0]["model_state_mb"] - 8 * params / 2**20) / (8 * params / 2**20) < 0.05, base[0]
    # ... and with NVMe offload only the gradient shards (4P/2 = 2P bytes) stay resident
    assert abs(nvme[0]["model_state_mb"] - 2 * params / 2**20) / (2 * params / 2**20) < 0.05, nvme[0]
    saved = base[0]["rss_mb"] - nvme[0]["rss_mb"]
    expected = 6 * params / 2**20
    print(f"resident after 3 steps: {base[0]['rss_mb']:.0f} MB -> {nvme[0]['rss_mb']:.0f} MB with NVMe offload "
          f"(model states {base[0]['model_state_mb']:.1f} -> {nvme[0]['model_state_mb']:.1f} MB)")
    # The 6P bytes leave memory, but NVMe offload holds staging of its own (the Adam sub-group streamed through
    # memory, read-ahead shard buffers) and the allocator keeps some freed pages (18-23 MB of 32 MB were measured
    # leaving when the master was a separate 2P-byte copy).
    assert saved > 0.35 * expected, f"RSS fell by {saved:.1f} MB, expected about {expected:.1f} MB"
