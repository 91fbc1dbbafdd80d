"""``deepspeed.utils.groups``: the process-group getters integrations call (accelerate and Trainer read the
sequence-parallel ones after ``UlyssesSPAttentionHF.register_with_transformers``).

Sequence-parallel getters answer from the mpu of the active Ulysses registration (``sp/hf_registry.py``); with
none, the world is one sequence-parallel group of size 1 per rank, as DeepSpeed reports without SP."""

from __future__ import annotations

from typing import Any

from shardwise import comm
from shardwise.sp.hf_registry import active_mpu


def _get_sequence_parallel_group() -> Any:
    mpu = active_mpu()
    return mpu.get_sequence_parallel_group() if mpu is not None else None


def _get_sequence_parallel_world_size() -> int:
    mpu = active_mpu()
    return mpu.get_sequence_parallel_world_size() if mpu is not None else 1


def _get_sequence_parallel_rank() -> int:
    mpu = active_mpu()
    return mpu.get_sequence_parallel_rank() if mpu is not None else 0


def _get_data_parallel_group() -> Any:
    mpu = active_mpu()
    return mpu.get_data_parallel_group() if mpu is not None else comm.world_group()


def _get_data_parallel_world_size() -> int:
    mpu = active_mpu()
    return mpu.get_data_parallel_world_size() if mpu is not None else comm.get_world_size()


def _get_data_parallel_rank() -> int:
    mpu = active_mpu()
    return mpu.get_data_parallel_rank() if mpu is not None else comm.get_rank()


__all__ = ["_get_data_parallel_group", "_get_data_parallel_rank", "_get_data_parallel_world_size",
           "_get_sequence_parallel_group", "_get_sequence_parallel_rank", "_get_sequence_parallel_world_size"]
