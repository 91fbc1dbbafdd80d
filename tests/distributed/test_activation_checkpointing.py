"""Activation checkpointing inside a tensor-parallel model: partitioned saved inputs (gathered over the tensor group
for recomputation), host copies, contiguous buffers; gradients bitwise identical to no checkpointing with dropout
(tensor-parallel RNG tracker), saved-input memory halved by partitioning, and engine training parity."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import shardwise as deepspeed
from shardwise.comm import COMMS_LOG
from shardwise.comm.topology import Topology
from shardwise.models import Llama
from shardwise.models import llama as llama_module
from shardwise.tp import ModelParallelUnit, model_parallel_cuda_manual_seed
from tests.dist import run_ranks
from tests.distributed.llama_helpers import TINY, ds_config, llama_batch, train_parallel
from tests.distributed.test_tp_training import _check

OPTIONS = {
    "off": None,
    "plain": {},
    "partition": {"partition_activations": True},
    "partition+cpu": {"partition_activations": True, "checkpoint_in_cpu": True},
    "partition+contiguous": {"partition_activations": True, "contiguous_checkpointing": True,
                             "num_checkpoints": TINY.n_layers},
}


def _run(topo: Topology, variant: str, options: dict | None) -> dict:
    cfg = replace(TINY, dropout=0.2, checkpoint_activations=options is not None)
    if options is not None:
        deepspeed.checkpointing.configure(ModelParallelUnit(topo), **options)
    llama_module.checkpoint = getattr(deepspeed.checkpointing, variant)
    torch.manual_seed(0)
    model = Llama(cfg, topo).train()
    model_parallel_cuda_manual_seed(42, tp_rank=topo.coord("tp"))
    x, y = llama_batch(0, 0)
    COMMS_LOG.reset()
    loss = model(x, y)
    saved = deepspeed.checkpointing.memory_stats().get("cpu", 0)
    loss.backward()
    gathers = COMMS_LOG.totals(op="all_gather", group="tp").count
    return {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "saved": saved, "gathers": gathers}


def _all_options(variant: str) -> dict:
    topo = Topology(tp=2)
    return {name: _run(topo, variant, opts) for name, opts in OPTIONS.items()}


@pytest.mark.parametrize("variant", ["checkpoint", "non_reentrant_checkpoint"])
def test_tp_checkpointing_is_bitwise_identical_for_every_option(variant):
    for rank, runs in enumerate(run_ranks(_all_options, variant)):
        off = runs["off"]
        for name, run in runs.items():
            assert run["loss"] == off["loss"], (rank, name)
            for param, grad in off["grads"].items():
                assert torch.equal(run["grads"][param], grad), (rank, name, param)
        # saved inputs: each block keeps its [batch, seq, dim] input; partitioned, half of it per rank
        full = TINY.n_layers * 4 * 16 * TINY.dim * 4
        assert runs["plain"]["saved"] >= full
        for name in ("partition", "partition+cpu", "partition+contiguous"):
            assert runs[name]["saved"] <= runs["plain"]["saved"] - full // 2, (name, runs[name]["saved"])
            assert runs[name]["gathers"] == TINY.n_layers  # one all-gather per checkpoint to recompute
        assert runs["plain"]["gathers"] == 0


def _engine_with_checkpointing(stage: int) -> tuple:
    topo = Topology(tp=2)
    ds = ds_config(stage, 1, activation_checkpointing={"partition_activations": True, "profile": False})
    deepspeed.checkpointing.configure(ModelParallelUnit(topo), deepspeed_config=ds)
    assert deepspeed.checkpointing.get_settings().partition_activations
    return train_parallel(replace(TINY, checkpoint_activations=True), ds, tp=2)


@pytest.mark.parametrize("stage", [0, 2])
def test_engine_training_with_partitioned_checkpoints_matches_reference(stage):
    _check(run_ranks(_engine_with_checkpointing, stage), TINY, 1)
