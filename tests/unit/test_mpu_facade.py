"""One mpu facade, one creator of process groups, one reader of foreign mpu objects (issue 16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shardwise.comm.foreign_mpu import MpuReader, tensor_rank_of, topology_of
from shardwise.comm.topology import Topology
from shardwise.pipe.grid import PipelineParallelGrid
from shardwise.tp.mpu import ModelParallelUnit

ROOT = Path(__file__).resolve().parents[2] / "shardwise"


@pytest.mark.parametrize("pp,tp,world", [(2, 1, 4), (1, 2, 4), (2, 2, 8), (1, 1, 2)])
def test_facades_agree_model_parallel_is_pipeline_times_tensor(pp, tp, world):
    for rank in range(world):
        topo = Topology(pp=pp, tp=tp, world_size=world, rank=rank, local_world_size=world, create_groups=False)
        for mpu in (ModelParallelUnit(topo), PipelineParallelGrid(topo)):
            assert mpu.get_model_parallel_world_size() == pp * tp
            assert mpu.get_tensor_model_parallel_world_size() == mpu.get_slice_parallel_world_size() == tp
            assert mpu.get_pipe_parallel_world_size() == pp
            assert mpu.get_data_parallel_world_size() == world // (pp * tp)
            assert mpu.get_tensor_model_parallel_rank() == topo.coord("tp")
        grid = PipelineParallelGrid(topo)
        assert grid.model_parallel_size == pp * tp and grid.slice_parallel_size == tp
        assert grid.topology() is topo and topology_of(grid) is topo


def test_reader_asks_foreign_mpus_by_their_own_names():
    class DeepSpeedGrid:  # DeepSpeed's names for the tensor axis
        def get_slice_parallel_world_size(self):
            return 2

        def get_slice_parallel_rank(self):
            return 1

    class Legacy:  # Megatron's legacy names
        def get_model_parallel_rank(self):
            return 3

    assert MpuReader(DeepSpeedGrid()).size("tp") == 2 and tensor_rank_of(DeepSpeedGrid()) == 1
    assert tensor_rank_of(Legacy()) == 3 and MpuReader(Legacy()).size("dp") is None
    assert tensor_rank_of(object()) == 0


def test_only_topology_creates_process_groups():
    callers = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if re.search(r"\bnew_group\(", p.read_text())]
    assert callers == ["comm/topology.py"], callers
