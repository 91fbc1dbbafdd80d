"""3D parallelism: the LLaMA reference model as pipeline stages with tensor parallelism (and Megatron sequence
parallelism) inside each stage and ZeRO-1 across data-parallel replicas, against the float64 single-process
model: every train_batch loss and the final weights within 1e-5 relative."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import shardwise
from shardwise.comm.topology import Topology
from shardwise.models import Llama
from shardwise.pipe import PipelineModule
from tests.dist import run_ranks
from tests.distributed.llama_helpers import CLIP, OPTIMIZERS, STEPS, TINY, llama_batch, reference
from tests.models import assert_close_rel

GAS = 2


def _train(pp: int, tp: int, sequence_parallel: bool, stage: int) -> dict:
    from examples import llama_3d as ex

    topo = Topology(pp=pp, tp=tp)
    cfg = replace(TINY, sequence_parallel=sequence_parallel)
    model = PipelineModule(ex.llama_pipe_specs(cfg, topo), topology=topo, loss_fn=ex.LlamaPipeLoss(topo),
                           partition_method="type:BlockPipe")
    torch.manual_seed(0)  # the reference's initial weights (tests/distributed/llama_helpers.reference)
    ex.load_plain_weights(model, cfg, Llama(replace(cfg, sequence_parallel=False)).state_dict())
    dp = topo.size("dp")
    config = {"train_batch_size": 4 * dp, "train_micro_batch_size_per_gpu": 4 // GAS, "gradient_clipping": CLIP,
              "optimizer": OPTIMIZERS["sgd"][0], "zero_optimization": {"stage": stage}}
    engine, _, _, _ = shardwise.initialize(model=model, config=config)
    losses = []
    for step in range(STEPS):
        x, y = llama_batch(step, topo.coord("dp"))
        half = x.shape[0] // GAS
        micro = [(x[i * half:(i + 1) * half], y[i * half:(i + 1) * half]) for i in range(GAS)]
        losses.append(engine.train_batch(iter(micro)).item())
    return {"losses": losses, "weights": ex.stage_full_weights(engine.module, cfg)}


def _check(results: list[dict], dp: int) -> None:
    ref_losses, ref_params = reference(TINY, dp)
    seen = set()
    for rank, res in enumerate(results):
        assert_close_rel(res["losses"], ref_losses, what=f"rank {rank} losses")
        for name, value in res["weights"].items():
            assert_close_rel(value, ref_params[name], what=f"rank {rank} {name}")
            seen.add(name)
    assert seen == set(ref_params), set(ref_params) ^ seen


@pytest.mark.world4
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_pp2_tp2_matches_reference(sequence_parallel: bool) -> None:
    _check(run_ranks(_train, 2, 2, sequence_parallel, 0, world_size=4), dp=1)


@pytest.mark.slow
def test_pp2_tp2_dp2_sequence_parallel_zero1_matches_reference() -> None:
    _check(run_ranks(_train, 2, 2, True, 1, world_size=8, timeout=120), dp=2)
