"""Layer partitioning (pure) and PipelineModule construction for one stage of a larger grid (no process groups)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardwise.comm.topology import Topology
from shardwise.pipe import LayerSpec, PipelineError, PipelineModule, TiedLayerSpec
from shardwise.pipe.partition import PartitionError, partition_balanced, partition_layers, partition_uniform
from shardwise.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology, to_degrees
from tests.pipe_models import pair_mlp_specs


def test_uniform_gives_the_first_parts_one_more() -> None:
    assert partition_uniform(7, 3) == [0, 3, 5, 7]
    assert partition_uniform(8, 4) == [0, 2, 4, 6, 8]
    assert partition_uniform(2, 4) == [0, 1, 2, 2, 2]


@pytest.mark.parametrize(("weights", "parts", "expected"), [
    ([1, 1, 1, 1], 4, [0, 1, 2, 3, 4]),
    ([1, 1, 1, 1, 1], 4, [0, 1, 2, 3, 5]),  # DeepSpeed's test accepts this or [0, 2, 3, 4, 5]
    ([10, 1, 1, 1, 1, 10], 2, [0, 3, 6]),
    ([5, 0, 0, 5, 0, 5], 3, [0, 1, 4, 6]),  # weightless layers join the next part
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, [0, 5, 7, 9]),  # max part 17 (the optimum; 1..5 = 15, 6+7 = 13, 8+9 = 17)
])
def test_balanced_minimises_the_heaviest_part(weights: list[int], parts: int, expected: list[int]) -> None:
    assert partition_balanced(weights, parts) == expected


def test_balanced_is_optimal_on_random_weights() -> None:
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(50):
        weights = [rng.randint(0, 9) for _ in range(rng.randint(3, 8))]
        parts = rng.randint(1, min(4, len(weights)))
        bounds = partition_balanced(weights, parts)
        assert bounds[0] == 0 and bounds[-1] == len(weights) and bounds == sorted(bounds)
        assert all(bounds[i] < bounds[i + 1] for i in range(parts)), (weights, bounds)  # every part has a layer
        best = min(max(sum(weights[a:b]) for a, b in zip((0, *cut), (*cut, len(weights))))
                   for cut in itertools.combinations(range(1, len(weights)), parts - 1))
        assert max(sum(weights[bounds[i]:bounds[i + 1]]) for i in range(parts)) == best


def test_type_regex_balances_matching_layers() -> None:
    names = ["Embedding", "Block", "Block", "Block", "Block", "LayerNorm", "Linear"]
    assert partition_layers("type:block", 2, names, []) == [0, 3, 7]
    with pytest.raises(PartitionError, match="matches no layer"):
        partition_layers("type:Attention", 2, names, [])
    with pytest.raises(PartitionError, match="not supported"):
        partition_layers("profile", 2, names, [])


def _stage(stage: int, stages: int, specs: list, **kw: object) -> PipelineModule:
    topo = Topology(pp=stages, world_size=stages, rank=stage, create_groups=False)
    return PipelineModule(specs, topology=topo, seed_layers=True, **kw)


def test_a_stage_builds_only_its_layers_under_global_names() -> None:
    specs = pair_mlp_specs(depth=2)  # 8 layers: uniform over 2 stages -> [0, 4) and [4, 8)
    first, second = (_stage(s, 2, specs, partition_method="uniform") for s in range(2))
    assert first.parts == [0, 4, 8] and first.chunk_bounds(0) == (0, 4)
    assert set(first.state_dict()) == {"0.weight", "0.bias", "3.lin.weight", "3.lin.bias", "tied_modules.mid.weight"}
    assert set(second.state_dict()) == {"4.lin.weight", "4.lin.bias", "7.weight", "7.bias", "tied_modules.mid.weight"}
    assert [second.stage_owner(i) for i in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_layer_names_match_a_sequential_of_the_same_layers() -> None:
    layers = [nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)]
    pipe = _stage(0, 1, layers, partition_method="uniform")
    assert set(pipe.state_dict()) == set(nn.Sequential(*layers).state_dict())


def test_parameters_method_balances_weights_and_virtual_stages_take_every_pth_part() -> None:
    specs = [LayerSpec(nn.Linear, 64, 64), torch.tanh, LayerSpec(nn.Linear, 64, 8), LayerSpec(nn.Linear, 8, 8),
             LayerSpec(nn.Linear, 8, 8), LayerSpec(nn.Linear, 8, 64)]
    mod = _stage(0, 2, specs)  # counts: 4160, 0, 520, 72, 72, 576 -> the big layer alone, 1240 on stage 1
    assert mod.parts == [0, 1, 6]
    chunked = _stage(1, 2, specs, partition_method="uniform", virtual_stages=3)
    assert chunked.parts == [0, 1, 2, 3, 4, 5, 6] and [chunked.chunk_bounds(c) for c in range(3)] == [
        (1, 2), (3, 4), (5, 6)]
    assert set(chunked.state_dict()) == {"3.weight", "3.bias", "5.weight", "5.bias"}


def test_tied_layers_are_indexed_with_the_first_use_as_owner() -> None:
    specs = pair_mlp_specs(depth=1)  # tied at layers 2 and 4 of 7; uniform over 4 stages: [0,2,4,6,7]
    mods = [_stage(s, 4, specs, partition_method="uniform") for s in range(4)]
    holders = [s for s, m in enumerate(mods) if m.tied_comms]
    assert holders == [1, 2] and mods[1].tied_comms["mid"]["ranks"] == [1, 2]
    assert mods[1].tied_duplicates() == [] and len(mods[2].tied_duplicates()) == 1


def test_forward_runs_the_stage_layers_with_checkpointing() -> None:
    specs = pair_mlp_specs(depth=2)
    plain = _stage(0, 1, specs, partition_method="uniform")
    ckpt = _stage(0, 1, specs, partition_method="uniform", activation_checkpoint_interval=2)
    x = torch.randn(3, 8, requires_grad=True)
    a, b = plain(x), ckpt(x)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    grads = [p.grad.clone() for p in plain.parameters()]
    x.grad = None
    b.sum().backward()
    for g, p in zip(grads, ckpt.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_topology_classes_and_errors() -> None:
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    assert topo.get_rank(pipe=1, data=0, model=1) == 5 and topo.get_coord(6) == (1, 1, 0)
    assert topo.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.filter_match(pipe=0, data=1) == [2, 3] and topo.get_rank_repr(5) == "model_01"
    assert to_degrees(topo) == {"pp": 2, "dp": 2, "tp": 2}
    assert to_degrees(PipeDataParallelTopology(num_pp=4, num_dp=2)) == {"pp": 4, "dp": 2, "tp": 1}
    from shardwise.pipe import ProcessTopology

    with pytest.raises(ValueError, match="pipe > data > model"):
        to_degrees(ProcessTopology(["data", "pipe"], [2, 2]))
    with pytest.raises(PipelineError, match="num_stages=4 disagrees"):
        PipelineModule([nn.Linear(2, 2)], num_stages=4, topology=Topology(pp=2, world_size=2, rank=0,
                                                                            create_groups=False))
    with pytest.raises(TypeError, match="nn.Module subclass"):
        LayerSpec(torch.tanh)
    assert TiedLayerSpec("k", nn.Linear, 2, 2, tied_weight_attr="weight").tied_weight_attr == ["weight"]


def test_deepspeed_import_paths_resolve() -> None:
    import shardwise as deepspeed
    from shardwise.pipe.engine import PipelineEngine
    from shardwise.pipe.schedule import TrainSchedule

    assert deepspeed.pipe.PipelineModule is PipelineModule and deepspeed.LayerSpec is LayerSpec
    assert deepspeed.runtime.pipe.module.TiedLayerSpec is TiedLayerSpec
    assert deepspeed.runtime.pipe.topology.PipeModelDataParallelTopology is PipeModelDataParallelTopology
    assert deepspeed.runtime.pipe.engine.PipelineEngine is PipelineEngine
    assert deepspeed.runtime.pipe.schedule.TrainSchedule is TrainSchedule
    assert deepspeed.utils.RepeatingLoader([1, 2]).__next__() == 1
