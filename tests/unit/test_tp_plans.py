"""Tensor-parallel plans and split math on one process: partition sizes, fused parts and their gather order, pattern
matching, plan application (the single-rank fast path must reproduce the plain model exactly), built-in Hugging
Face plans, and the mpu bridge's errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardwise.comm.topology import Topology
from shardwise.models import Llama, LlamaConfig
from shardwise.models.llama import tp_plan
from shardwise.tp import (
    ColumnParallelLinear,
    ColwiseParallel,
    DimSplit,
    ModelParallelUnit,
    MpuLayoutError,
    PlanError,
    RowParallelLinear,
    SplitError,
    VocabParallelEmbedding,
    apply_plan,
    partition_sizes,
    plan_for,
    topology_from_mpu,
)
from shardwise.tp.plans import matches, resolve_plan


def test_partition_sizes_are_even_on_grains_first_ranks_larger():
    assert partition_sizes(10, 4) == [3, 3, 2, 2]
    assert partition_sizes(6 * 64, 4, grain=64) == [128, 128, 64, 64]
    assert partition_sizes(8, 2) == [4, 4]
    with pytest.raises(SplitError, match="grains of 64"):
        partition_sizes(100, 2, grain=64)


def test_fused_parts_split_per_part_and_gather_back_in_full_order():
    split = DimSplit.of(8, 2, grain=1, parts=(4, 2, 2))  # q | k | v
    assert split.ranges(0) == [(0, 2), (4, 5), (6, 7)]
    assert split.ranges(1) == [(2, 4), (5, 6), (7, 8)]
    assert split.sizes() == [4, 4] and split.part_sizes(1) == [2, 1, 1]
    full = torch.arange(8)
    rank_order = torch.cat([torch.cat([full[lo:hi] for lo, hi in split.ranges(r)]) for r in range(2)])
    assert torch.equal(rank_order.index_select(0, torch.tensor(split.gather_permutation())), full)
    assert DimSplit.of(8, 2).gather_permutation() is None
    with pytest.raises(SplitError, match="fewer than the 4 ranks"):
        DimSplit.of(4 * 8, 4, grain=8, parts=(16, 8, 8))  # one key/value head for four ranks
    with pytest.raises(SplitError, match="add up"):
        DimSplit.of(8, 2, parts=(4, 2))


def test_pattern_atoms_never_cross_dots():
    assert matches("layers.*.attn.wqkv", "layers.0.attn.wqkv")
    assert not matches("layers.*.attn.wqkv", "layers.0.1.attn.wqkv")
    assert not matches("layers.*.attn", "layers.0.attn.wqkv")
    assert matches("model.layers.[0-3].mlp.*_proj", "model.layers.2.mlp.up_proj")


def test_resolve_plan_first_pattern_wins_and_strict_reports_unused_patterns():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    chosen = resolve_plan(model, {"0": "replicate", "*": "colwise"})
    assert [(p, s) for p, s in chosen] == [("0", None), ("1", ColwiseParallel())]
    with pytest.raises(PlanError, match=r"matched no module: \['2'\]"):
        resolve_plan(model, {"2": "colwise"})
    assert resolve_plan(model, {"2": "colwise"}, strict=False) == []
    with pytest.raises(PlanError, match="unknown style"):
        resolve_plan(model, {"0": "column"})


def test_style_on_the_wrong_module_type_is_refused():
    with pytest.raises(PlanError, match="applies to Embedding"):
        apply_plan(nn.Sequential(nn.Linear(4, 4)), {"0": "vocab"}, None)


def _tokens(cfg: LlamaConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_llama_plan_on_one_rank_reproduces_the_plain_model(sequence_parallel):
    cfg = LlamaConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, sequence_parallel=sequence_parallel)
    torch.manual_seed(0)
    plain = Llama(cfg)
    torch.manual_seed(0)
    planned = apply_plan(Llama(cfg), tp_plan(cfg), None)
    assert isinstance(planned.layers[0].attn.wqkv, ColumnParallelLinear)
    assert isinstance(planned.layers[1].ffn.w2, RowParallelLinear)
    assert isinstance(planned.tok_embeddings, VocabParallelEmbedding)
    assert planned.layers[0].attn.wqkv.weight.tensor_model_parallel
    assert getattr(planned.norm.weight, "sequence_parallel", False) == sequence_parallel
    x = _tokens(cfg)
    assert torch.equal(plain(x, x), planned(x, x))


def test_layers_can_be_built_on_the_meta_device():
    with torch.device("meta"):
        layer = ColumnParallelLinear(1024, 4096)
    assert layer.weight.is_meta and layer.weight.shape == (4096, 1024)


def test_plan_for_unknown_model_names_the_fix():
    with pytest.raises(PlanError, match="no built-in"):
        plan_for(nn.Linear(2, 2))


def test_mpu_on_one_rank_and_layout_errors():
    topo = Topology()
    mpu = ModelParallelUnit(topo)
    assert topology_from_mpu(mpu) is topo
    assert (mpu.get_tensor_model_parallel_world_size(), mpu.get_data_parallel_world_size(),
            mpu.get_pipeline_model_parallel_world_size(), mpu.get_sequence_data_parallel_world_size()) == (1, 1, 1, 1)
    assert mpu.is_pipeline_first_stage() and mpu.is_pipeline_last_stage()

    class WrongSizes:
        def get_tensor_model_parallel_world_size(self):
            return 2

        def get_data_parallel_world_size(self):
            return 1

    with pytest.raises(MpuLayoutError, match="= 2 ranks, but the job has 1"):
        topology_from_mpu(WrongSizes())

    class NoData:
        def get_model_parallel_world_size(self):
            return 1

    with pytest.raises(MpuLayoutError, match="get_data_parallel_world_size"):
        topology_from_mpu(NoData())
