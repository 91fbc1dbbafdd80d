"""``PipelineParallelGrid``: DeepSpeed's grid / Megatron's mpu method names answered from a ``Topology``.

``PipelineModule.mpu()`` returns one, for code written against DeepSpeed's ``PipelineParallelGrid``. Groups are
``shardwise.comm.Group`` objects (accepted by every ``shardwise.comm`` collective; ``.torch_group`` is the torch
process group, None for a one-rank group).
"""

from __future__ import annotations

from typing import Any

from shardwise.comm.topology import Topology


class PipelineParallelGrid:
    """Rank and group queries of a pipeline x data x tensor grid."""

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self.global_rank = topology.rank
        self.world_size = topology.world_size
        self.pipe_parallel_size = topology.size("pp")
        self.data_parallel_size = topology.size("dp")
        self.model_parallel_size = topology.size("tp")
        self.slice_parallel_size = self.model_parallel_size
        self.stage_id = topology.coord("pp")
        self.data_parallel_id = topology.coord("dp")
        self.is_first_stage = self.stage_id == 0
        self.is_last_stage = self.stage_id == self.pipe_parallel_size - 1

    def topology(self) -> Topology:
        """The underlying grid."""
        return self._topology

    def get_global_rank(self) -> int:
        """This process's global rank."""
        return self.global_rank

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

    # pipeline
    def get_pipe_parallel_rank(self) -> int:
        """Stage index."""
        return self.stage_id

    def get_pipe_parallel_world_size(self) -> int:
        """Number of stages."""
        return self.pipe_parallel_size

    def get_pipe_parallel_group(self) -> Any:
        """Ranks forming this rank's pipeline."""
        return self._topology.pp_group

    # data
    def get_data_parallel_rank(self) -> int:
        """Index in the data-parallel group."""
        return self.data_parallel_id

    def get_data_parallel_world_size(self) -> int:
        """Data-parallel degree."""
        return self.data_parallel_size

    def get_data_parallel_group(self) -> Any:
        """Replicas of this rank's stage and tensor slice."""
        return self._topology.dp_group

    # tensor (DeepSpeed calls it "model" or "slice" parallel)
    def get_model_parallel_rank(self) -> int:
        """Tensor-parallel rank."""
        return self._topology.coord("tp")

    def get_model_parallel_world_size(self) -> int:
        """Tensor-parallel degree."""
        return self.model_parallel_size

    def get_model_parallel_group(self) -> Any:
        """Tensor-parallel group."""
        return self._topology.tp_group

    get_slice_parallel_rank = get_model_parallel_rank
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
