"""The one reader of model-parallel units (``mpu`` objects): Megatron's ``parallel_state``, Megatron-DeepSpeed's,
DeepSpeed's ``PipelineParallelGrid``, DeepSpeed's Ulysses state, and shardwise's own facade or ``Topology``.

Those objects name the same questions differently (the tensor axis is "tensor model parallel" in Megatron,
"slice parallel" in DeepSpeed's grid and, in legacy code, "model parallel"), and each knows only some of them.
``MpuReader`` asks by axis and returns None for what the mpu does not know; nothing else in shardwise looks up
mpu methods by name. shardwise's own objects (``HasTopology``) are answered from their ``Topology`` directly.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from shardwise.comm.group import Group, as_group

#: mpu method names per axis and question, in order of preference (Megatron's first, DeepSpeed's grid next, the
#: legacy "model parallel" name for the tensor axis last)
SIZE_NAMES = {
    "tp": ("get_tensor_model_parallel_world_size", "get_slice_parallel_world_size", "get_model_parallel_world_size"),
    "pp": ("get_pipeline_model_parallel_world_size", "get_pipe_parallel_world_size"),
    "sp": ("get_sequence_parallel_world_size",),
    "dp": ("get_data_parallel_world_size",),
}
GROUP_NAMES = {
    "tp": ("get_tensor_model_parallel_group", "get_slice_parallel_group", "get_model_parallel_group"),
    "pp": ("get_pipeline_model_parallel_group", "get_pipe_parallel_group"),
    "sp": ("get_sequence_parallel_group",),
    "dp": ("get_data_parallel_group",),
}
RANK_NAMES = {
    "tp": ("get_tensor_model_parallel_rank", "get_slice_parallel_rank", "get_model_parallel_rank"),
    "pp": ("get_pipeline_model_parallel_rank", "get_pipe_parallel_rank"),
    "sp": ("get_sequence_parallel_rank",),
    "dp": ("get_data_parallel_rank",),
}


@runtime_checkable
class HasTopology(Protocol):
    """shardwise's own mpu objects (``ModelParallelUnit``, ``PipelineParallelGrid``): backed by a ``Topology``."""

    def shardwise_topology(self) -> Any:
        """The ``Topology`` the mpu answers from."""
        ...


class MpuReader:
    """Questions by axis ("tp", "pp", "sp", "dp") to any mpu; None where the mpu has no such method."""

    def __init__(self, mpu: object) -> None:
        self.mpu = mpu
        self.name = getattr(mpu, "__name__", type(mpu).__name__)

    def _call(self, names: tuple[str, ...]) -> tuple[str | None, Any]:
        for name in names:
            fn = getattr(self.mpu, name, None)
            if callable(fn):
                return name, fn()
        return None, None

    def has(self, axis: str) -> bool:
        """Whether the mpu reports the size of ``axis``."""
        return self._call(SIZE_NAMES[axis])[0] is not None

    def size(self, axis: str) -> int | None:
        """Degree of ``axis``."""
        _, value = self._call(SIZE_NAMES[axis])
        return None if value is None else int(value)

    def rank(self, axis: str) -> int | None:
        """This rank's index on ``axis``."""
        _, value = self._call(RANK_NAMES[axis])
        return None if value is None else int(value)

    def group(self, axis: str) -> tuple[str | None, Any]:
        """(method name, the group it returned) for ``axis``; (None, None) when the mpu has none."""
        return self._call(GROUP_NAMES[axis])


def tensor_group_of(mpu: object) -> Group | None:
    """The tensor-parallel group of an mpu or a ``Topology`` as a ``Group`` (None when the mpu has none)."""
    topology = topology_of(mpu)
    if topology is not None:
        return topology.tp_group
    name, group = MpuReader(mpu).group("tp")
    return as_group(group) if name is not None else None


def tensor_rank_of(mpu: object) -> int:
    """This rank's tensor-parallel index from an mpu or a ``Topology`` (0 when it has none)."""
    topology = topology_of(mpu)
    if topology is not None:
        return topology.coord("tp")
    rank = MpuReader(mpu).rank("tp")
    return 0 if rank is None else rank


def topology_of(mpu: object) -> Any:
    """The ``Topology`` behind a ``Topology`` or one of shardwise's own mpu objects; None for a foreign mpu."""
    from shardwise.comm.topology import Topology

    if isinstance(mpu, Topology):
        return mpu
    if isinstance(mpu, HasTopology):
        return mpu.shardwise_topology()
    return None
