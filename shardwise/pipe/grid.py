"""``PipelineParallelGrid``: DeepSpeed's grid, the one mpu facade (``ModelParallelUnit``) plus DeepSpeed's grid
attributes and stage helpers.

``PipelineModule.mpu()`` returns one, for code written against DeepSpeed's ``PipelineParallelGrid``. Groups are
torch ProcessGroups (as every mpu hands out; ``Topology.torch_group``). "Model parallel" is pipeline x tensor, as
for ``ModelParallelUnit``: with pp=2, tp=1 on 4 ranks it has 2 ranks; the tensor axis alone is "slice parallel"
(``get_slice_parallel_*``) or "tensor model parallel".
"""

from __future__ import annotations

from shardwise.comm.topology import Topology
from shardwise.tp.mpu import ModelParallelUnit


class PipelineParallelGrid(ModelParallelUnit):
    """Rank and group queries of a pipeline x data x tensor grid."""

    def __init__(self, topology: Topology) -> None:
        super().__init__(topology)
        self.global_rank = topology.rank
        self.world_size = topology.world_size
        self.pipe_parallel_size = topology.size("pp")
        self.data_parallel_size = topology.size("dp")
        self.slice_parallel_size = topology.size("tp")
        self.model_parallel_size = topology.model_parallel_group.size
        self.stage_id = topology.coord("pp")
        self.data_parallel_id = topology.coord("dp")
        self.is_first_stage = self.stage_id == 0
        self.is_last_stage = self.stage_id == self.pipe_parallel_size - 1

    def topology(self) -> Topology:  # type: ignore[override]  # DeepSpeed's grid: a method, not a property
        """The underlying grid."""
        return self._topology

    def get_stage_id(self) -> int:
        """Pipeline stage of this rank."""
        return self.stage_id

    def get_data_parallel_id(self) -> int:
        """Data-parallel coordinate of this rank."""
        return self.data_parallel_id

    def stage_to_global(self, stage_id: int, **kwargs: int) -> int:
        """Global rank of ``stage_id`` with this rank's other coordinates (``data=``/``model=`` override them)."""
        names = {"data": "dp", "model": "tp", "pipe": "pp"}
        return self._topology.rank_at(pp=stage_id, **{names.get(k, k): v for k, v in kwargs.items()})
