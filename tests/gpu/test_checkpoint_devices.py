"""Checkpoints cross devices: saved on the GPU, loaded on the cpu accelerator (and into another ZeRO stage), trained
on, saved there, and loaded on the GPU again.

Stated: weights load bit-identical on either device; the optimizer state comes along (the continued run's losses
and weights match an uninterrupted GPU run within 1e-5 relative, the fp32 tolerance of the suite: CPU and GPU round
matmuls differently); step counters survive; a GPU checkpoint's device RNG state is ignored on the cpu (it has
none) and a CPU checkpoint loads on the GPU without one.
"""

from __future__ import annotations

import pytest
import torch

import shardwise
from tests.dist import run_ranks
from tests.gpu.harness import ACCELERATOR, run_gpu
from tests.models import assert_close_rel, mse_loss, rank_batch, tiny_mlp


def _engine(stage: int):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.05,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 200, "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    return engine


def _state(engine) -> dict[str, torch.Tensor]:
    with shardwise.zero.GatheredParameters(list(engine.module.parameters())):
        return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def _phase(save_dir: str, stage: int, load_tag: str | None, save_tag: str | None, first: int, steps: int) -> dict:
    engine = _engine(stage)
    if load_tag:
        engine.load_checkpoint(save_dir, tag=load_tag)
    loaded, loaded_steps = _state(engine), engine.global_steps
    losses = []
    for step in range(first, first + steps):
        x, y = (t.to(engine.device) for t in rank_batch(step, 0))
        loss = mse_loss(engine, x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if save_tag:
        engine.save_checkpoint(save_dir, tag=save_tag)
    return {"loaded": loaded, "loaded_steps": loaded_steps, "losses": losses, "final": _state(engine),
            "device": engine.device.type}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("gpu_stage,cpu_stage", [(2, 2), (3, 1)])
def test_gpu_checkpoint_loads_on_cpu_and_back(tmp_path, gpu_stage: int, cpu_stage: int) -> None:
    where = str(tmp_path)
    (ref,) = run_gpu(_phase, where, gpu_stage, None, None, 0, 4)  # uninterrupted, on the GPU
    (a,) = run_gpu(_phase, where, gpu_stage, None, "gpu2", 0, 2)
    (b,) = run_ranks(_phase, where, cpu_stage, "gpu2", "cpu4", 2, 2, world_size=1)  # the cpu accelerator, gloo
    (c,) = run_gpu(_phase, where, gpu_stage, "cpu4", None, 4, 1)
    assert a["device"] == c["device"] == ref["device"] == ACCELERATOR and b["device"] == "cpu"
    _same(b["loaded"], a["final"])
    assert b["loaded_steps"] == 2
    assert_close_rel(b["losses"], ref["losses"][2:], what="losses after loading on the cpu")
    for name, value in ref["final"].items():
        assert_close_rel(b["final"][name], value, what=f"{name} after 4 steps")
    _same(c["loaded"], b["final"])
    assert c["loaded_steps"] == 4 and len(c["losses"]) == 1
