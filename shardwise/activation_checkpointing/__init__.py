"""Activation checkpointing (DeepSpeed's ``deepspeed.checkpointing``, also importable as ``shardwise.checkpointing``
and ``shardwise.runtime.activation_checkpointing.checkpointing``).

::

    import shardwise as deepspeed
    deepspeed.checkpointing.configure(mpu, deepspeed_config="ds_config.json")   # or a dict / loaded config
    y = deepspeed.checkpointing.checkpoint(block, x)                            # recomputed in the backward

Options come from the ``activation_checkpointing`` config section (``partition_activations``,
``cpu_checkpointing``, ``contiguous_memory_optimization``, ``number_checkpoints``,
``synchronize_checkpoint_boundary``, ``profile``) or ``configure()``'s keyword arguments. The RNG tracker
(``get_cuda_rng_tracker``, ``model_parallel_cuda_manual_seed``) lives in ``shardwise.tp.random``.
"""

from shardwise.activation_checkpointing.buffers import release_contiguous_buffers
from shardwise.activation_checkpointing.function import (
    CheckpointFunction,
    checkpoint,
    detach_variable,
    non_reentrant_checkpoint,
)
from shardwise.activation_checkpointing.settings import (
    CheckpointingConfigError,
    Settings,
    configure,
    get_settings,
    is_configured,
    partition_activations_in_checkpoint,
    set_num_layers,
)
from shardwise.activation_checkpointing.storage import memory_stats
from shardwise.tp.random import (
    CudaRNGStatesTracker,
    RNGStatesTracker,
    get_cuda_rng_tracker,
    model_parallel_cuda_manual_seed,
    model_parallel_reconfigure_tp_seed,
)


def reset() -> None:
    """Drop the contiguous checkpoint buffers (DeepSpeed's ``reset``: call it after forward passes that had no
    backward, e.g. evaluation, when contiguous_memory_optimization is on). The configuration is kept."""
    release_contiguous_buffers()


__all__ = [
    "CheckpointFunction", "CheckpointingConfigError", "CudaRNGStatesTracker", "RNGStatesTracker", "Settings",
    "checkpoint", "configure", "detach_variable", "get_cuda_rng_tracker", "is_configured", "memory_stats",
    "model_parallel_cuda_manual_seed", "model_parallel_reconfigure_tp_seed", "non_reentrant_checkpoint",
    "partition_activations_in_checkpoint", "reset", "set_num_layers", "get_settings",
]
