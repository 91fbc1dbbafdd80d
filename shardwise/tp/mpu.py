"""The ``mpu`` (model-parallel unit) bridge, both ways.

* ``ModelParallelUnit(topology)``: an object with the Megatron / DeepSpeed method names
  (``get_tensor_model_parallel_rank``, ``get_data_parallel_group``, ``get_slice_parallel_world_size``, ...)
  answered from a ``Topology``, for user code written against an mpu and for
  ``deepspeed.checkpointing.configure(mpu, ...)``. Groups are returned as torch ProcessGroups, so
  ``torch.distributed.all_reduce(t, group=mpu.get_data_parallel_group())`` works.
* ``topology_from_mpu(mpu)``: what ``shardwise.initialize(mpu=...)`` calls. It reads the degrees from the user's
  own mpu (Megatron's ``parallel_state``, Megatron-DeepSpeed's, DeepSpeed's ``PipelineParallelGrid``), builds the
  matching ``Topology`` and checks that every group it can read has the same member ranks as ours, so ZeRO
  partitions over the data-parallel ranks of the user's layout and the gradient norm covers the whole grid.

"Model parallel" means tensor x pipeline (DeepSpeed's pipe grid); with one pipeline stage it is the tensor group,
which is what Megatron's legacy ``get_model_parallel_*`` return.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from shardwise import comm
from shardwise.comm.foreign_mpu import MpuReader, topology_of
from shardwise.comm.group import Group
from shardwise.comm.topology import Topology
from shardwise.tp import random as tp_random


class MpuLayoutError(ValueError):
    """A user's mpu describes a rank layout shardwise's process grid cannot reproduce."""


class ModelParallelUnit:
    """Megatron/DeepSpeed-style mpu backed by a ``Topology`` (axis order pp, dp, sp, tp; tp ranks consecutive).

    The one mpu facade of shardwise: ``PipelineParallelGrid`` (what ``PipelineModule.mpu()`` returns) is this class
    with DeepSpeed's grid attributes added. "Model parallel" is DeepSpeed's and Megatron's meaning: pipeline x
    tensor, the ranks holding different weights.
    """

    def __init__(self, topology: Topology) -> None:
        self._topology = topology

    @property
    def topology(self) -> Topology:
        """The process grid this mpu answers from."""
        return self._topology

    def shardwise_topology(self) -> Topology:
        """The process grid this mpu answers from (``comm.foreign_mpu.HasTopology``)."""
        return self._topology

    # -- groups as torch ProcessGroups ----------------------------------------------------------------------------
    def _torch(self, group: Group) -> Any:
        return self._topology.torch_group(group)

    def _rank(self, group: Group) -> int:
        return group.rank if group.size > 1 else 0

    # -- tensor parallel ------------------------------------------------------------------------------------------
    def get_tensor_model_parallel_group(self) -> Any:
        """Tensor-parallel group."""
        return self._torch(self._topology.tp_group)

    def get_tensor_model_parallel_world_size(self) -> int:
        """Tensor-parallel degree."""
        return self._topology.size("tp")

    def get_tensor_model_parallel_rank(self) -> int:
        """This rank's index in its tensor-parallel group."""
        return self._topology.coord("tp")

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tensor rank 0 in this rank's tensor group."""
        return self._topology.tp_group.global_rank(0)

    # DeepSpeed's PipelineParallelGrid calls the tensor axis "slice parallel"
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_rank = get_tensor_model_parallel_rank

    # -- model parallel (tensor x pipeline) -------------------------------------------------------------------------
    def get_model_parallel_group(self) -> Any:
        """Ranks holding different weights: tensor x pipeline (the tensor group when there is one stage)."""
        return self._torch(self._topology.model_parallel_group)

    def get_model_parallel_world_size(self) -> int:
        """Tensor x pipeline degree."""
        return self._topology.model_parallel_group.size

    def get_model_parallel_rank(self) -> int:
        """This rank's index in its model-parallel group."""
        return self._rank(self._topology.model_parallel_group)

    # -- data parallel --------------------------------------------------------------------------------------------
    def get_data_parallel_group(self) -> Any:
        """Pure data-parallel group (excludes sequence-parallel ranks, as Megatron-DeepSpeed's)."""
        return self._torch(self._topology.dp_group)

    def get_data_parallel_world_size(self) -> int:
        """Data-parallel degree."""
        return self._topology.size("dp")

    def get_data_parallel_rank(self) -> int:
        """This rank's index in its data-parallel group."""
        return self._topology.coord("dp")

    def get_data_parallel_src_rank(self) -> int:
        """Global rank of data rank 0 in this rank's data group."""
        return self._topology.dp_group.global_rank(0)

    # -- pipeline -------------------------------------------------------------------------------------------------
    def get_pipeline_model_parallel_group(self) -> Any:
        """The ranks of this rank's pipeline (one per stage)."""
        return self._torch(self._topology.pp_group)

    def get_pipeline_model_parallel_world_size(self) -> int:
        """Number of pipeline stages."""
        return self._topology.size("pp")

    def get_pipeline_model_parallel_rank(self) -> int:
        """This rank's stage."""
        return self._topology.coord("pp")

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank

    def is_pipeline_first_stage(self, ignore_virtual: bool = True) -> bool:
        """Whether this rank runs the first stage."""
        return self._topology.coord("pp") == 0

    def is_pipeline_last_stage(self, ignore_virtual: bool = True) -> bool:
        """Whether this rank runs the last stage."""
        return self._topology.coord("pp") == self._topology.size("pp") - 1

    # -- sequence parallel (Ulysses) --------------------------------------------------------------------------------
    def get_sequence_parallel_group(self) -> Any:
        """Ulysses sequence-parallel group."""
        return self._torch(self._topology.sp_group)

    def get_sequence_parallel_world_size(self) -> int:
        """Ulysses degree."""
        return self._topology.size("sp")

    def get_sequence_parallel_rank(self) -> int:
        """This rank's index in its sequence-parallel group."""
        return self._topology.coord("sp")

    def get_sequence_data_parallel_group(self) -> Any:
        """Data x sequence ranks: where ZeRO partitions and gradients are averaged."""
        return self._torch(self._topology.zero_group)

    def get_sequence_data_parallel_world_size(self) -> int:
        """Data x sequence degree."""
        return self._topology.zero_group.size

    def get_sequence_data_parallel_rank(self) -> int:
        """This rank's index in its data x sequence group."""
        return self._rank(self._topology.zero_group)

    # -- misc -----------------------------------------------------------------------------------------------------
    def get_global_rank(self) -> int:
        """This process's rank in the job."""
        return self._topology.rank

    def model_parallel_is_initialized(self) -> bool:
        """Always true: the groups exist once the Topology does."""
        return True

    def sequence_parallel_is_initialized(self) -> bool:
        """Always true: the groups exist once the Topology does."""
        return True

    def get_cuda_rng_tracker(self) -> tp_random.RNGStatesTracker:
        """The process-wide RNG tracker."""
        return tp_random.get_cuda_rng_tracker()

    def model_parallel_cuda_manual_seed(self, seed: int) -> None:
        """Seed the default and model-parallel streams for this rank's tensor index."""
        tp_random.model_parallel_cuda_manual_seed(seed, tp_rank=self.get_tensor_model_parallel_rank())

    def __repr__(self) -> str:
        return f"ModelParallelUnit({self._topology.describe()})"


# -- reading a user's mpu -----------------------------------------------------------------------------------------
def _read_sizes(reader: MpuReader) -> dict[str, int]:
    sizes = {axis: reader.size(axis) for axis in ("tp", "pp", "sp", "dp")}
    out = {axis: (1 if v is None else v) for axis, v in sizes.items() if axis != "dp"}
    if sizes["dp"] is not None:
        return {**out, "dp": sizes["dp"]}
    if reader.has("sp"):
        # DeepSpeed's Ulysses mpu (runtime.sequence_parallel.parallel_state_sp) knows only the sequence groups:
        # every other rank of the job is data parallel
        world = dist.get_world_size() if dist.is_initialized() else 1
        return {**out, "dp": max(1, world // (out["pp"] * out["sp"] * out["tp"]))}
    raise MpuLayoutError(f"the mpu {reader.name} has no get_data_parallel_world_size(); shardwise needs it (together "
                         "with get_tensor_model_parallel_world_size) to build the process grid")


def _group_ranks(group: Any) -> tuple[int, ...]:
    if group is None or group is dist.GroupMember.WORLD:
        return tuple(range(dist.get_world_size()))
    if isinstance(group, Group):
        return group.ranks
    return tuple(dist.get_process_group_ranks(group))


def topology_from_mpu(mpu: Any) -> Topology:
    """The ``Topology`` matching a Megatron/DeepSpeed-style mpu; raises ``MpuLayoutError`` if ranks differ."""
    own = topology_of(mpu)
    if own is not None:
        return own
    reader = MpuReader(mpu)
    sizes = _read_sizes(reader)
    world = dist.get_world_size() if dist.is_initialized() else 1
    product = sizes["pp"] * sizes["dp"] * sizes["sp"] * sizes["tp"]
    if product != world:
        raise MpuLayoutError(
            f"the mpu reports pipeline {sizes['pp']} x data {sizes['dp']} x sequence {sizes['sp']} x tensor "
            f"{sizes['tp']} = {product} ranks, but the job has {world}; if its data-parallel group includes the "
            "sequence-parallel ranks, pass an mpu whose get_data_parallel_world_size() excludes them"
        )
    topology = Topology(pp=sizes["pp"], dp=sizes["dp"], sp=sizes["sp"], tp=sizes["tp"])
    problems = []
    for axis in ("tp", "pp", "sp", "dp"):
        name, group = reader.group(axis)
        if name is None or not dist.is_initialized():
            continue
        theirs, ours = _group_ranks(group), topology.group(axis).ranks
        if tuple(sorted(theirs)) != ours:
            problems.append(f"{name}() has ranks {list(theirs)} but shardwise's {axis} group is {list(ours)}")
    every = comm.all_gather_object(problems) if dist.is_initialized() else [problems]
    if any(every):
        first = next(p for p in every if p)
        raise MpuLayoutError(
            "the mpu's rank layout differs from shardwise's (axes outer->inner: pipeline, data, sequence, tensor; "
            f"tensor ranks consecutive): {'; '.join(first)}. Build the mpu with that order (Megatron's default), "
            "or pass shardwise.tp.ModelParallelUnit(Topology(...)) instead"
        )
    return topology
