"""Activation-checkpointing settings: ``configure()``, ``is_configured()``, and where partitions go.

The settings are process-wide, as DeepSpeed's are, because user code reaches them through module functions
(``deepspeed.checkpointing.configure(mpu, deepspeed_config=...)`` then ``deepspeed.checkpointing.checkpoint``).
They come from the ``activation_checkpointing`` section of a ds_config (dict, path, or loaded config), overridden
by explicit keyword arguments, and are validated once here, so a checkpoint call only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from shardwise.activation_checkpointing.buffers import CheckpointingConfigError, release_contiguous_buffers
from shardwise.comm.foreign_mpu import tensor_group_of
from shardwise.comm.group import Group
from shardwise.common.logging import log_dist
from shardwise.tp import random as tp_random


@dataclass(frozen=True)
class Settings:
    """What ``checkpoint()`` does with the inputs it saves (the JSON keys of the ``activation_checkpointing``
    section, with DeepSpeed's ``configure()`` keyword names noted)."""

    partition_activations: bool = False
    """Keep only this rank's 1/tp slice of each saved input; all-gather it for recomputation."""
    cpu_checkpointing: bool = False
    """Keep saved inputs (or their slices) in host memory (``checkpoint_in_cpu``)."""
    contiguous_memory_optimization: bool = False
    """Copy saved slices into buffers preallocated for ``number_checkpoints`` checkpoints
    (``contiguous_checkpointing``); needs partition_activations."""
    number_checkpoints: int | None = None
    """How many checkpoints one forward pass stores (``num_checkpoints``): sizes the contiguous buffers."""
    synchronize_checkpoint_boundary: bool = False
    """Synchronise the accelerator at the start and end of each checkpoint's forward and backward (``synchronize``)."""
    profile: bool = False
    """Log the forward and recompute+backward time of every checkpoint."""


_settings = Settings()
_configured = False
_group: Group | None = None  # where partitions are split: the tensor-parallel group


def get_settings() -> Settings:
    """The current settings."""
    return _settings


def partition_group() -> Group | None:
    """The tensor-parallel group saved inputs are partitioned over (None: no model parallelism)."""
    return _group


def is_configured() -> bool:
    """Whether ``configure()`` has been called (DeepSpeed's ``is_configured``)."""
    return _configured


def _section_from(config: Any) -> Settings:
    """The ``activation_checkpointing`` section of a ds_config given as a dict, path, or loaded config."""
    from shardwise.config import ActivationCheckpointingConfig, ConfigError, read_config_dict
    from shardwise.config.errors import problems_from_validation

    if isinstance(config, ActivationCheckpointingConfig):
        section = config
    elif hasattr(config, "activation_checkpointing") and not isinstance(config, dict):
        section = config.activation_checkpointing
    else:
        raw = read_config_dict(config).get("activation_checkpointing") or {}
        try:
            section = ActivationCheckpointingConfig.model_validate(raw)
        except Exception as exc:  # pydantic.ValidationError -> the config package's readable error
            if not hasattr(exc, "errors"):
                raise
            raise ConfigError.from_problems(problems_from_validation(exc, prefix="activation_checkpointing")) from None
    return Settings(
        partition_activations=section.partition_activations,
        cpu_checkpointing=section.cpu_checkpointing,
        contiguous_memory_optimization=section.contiguous_memory_optimization,
        number_checkpoints=section.number_checkpoints,
        synchronize_checkpoint_boundary=section.synchronize_checkpoint_boundary,
        profile=section.profile,
    )


def _group_of(mpu: Any) -> Group | None:
    """The tensor-parallel group of an mpu (ours, Megatron's, DeepSpeed's pipe grid) or a Topology."""
    if mpu is None:
        return None
    group = tensor_group_of(mpu)
    if group is None:
        raise CheckpointingConfigError(f"{type(mpu).__name__} has no get_tensor_model_parallel_group() or "
                                       "get_model_parallel_group(); pass a Megatron-style mpu, a shardwise Topology, "
                                       "or None")
    return group


def configure(mpu_: Any, deepspeed_config: Any = None, partition_activations: bool | None = None,
              contiguous_checkpointing: bool | None = None, num_checkpoints: int | None = None,
              checkpoint_in_cpu: bool | None = None, synchronize: bool | None = None,
              profile: bool | None = None) -> None:
    """Configure activation checkpointing (DeepSpeed's signature and semantics).

    ``mpu_``: a Megatron-style mpu, ``shardwise.tp.ModelParallelUnit`` or a ``Topology`` (its tensor group is
    where ``partition_activations`` splits saved inputs, and where the RNG tracker's rank comes from), or None.
    ``deepspeed_config``: a ds_config dict, JSON path or loaded config; its ``activation_checkpointing`` section
    sets the defaults, which the other keyword arguments override. Every call starts from the defaults.
    """
    global _settings, _configured, _group
    base = _section_from(deepspeed_config) if deepspeed_config is not None else Settings()
    overrides = {
        "partition_activations": partition_activations, "contiguous_memory_optimization": contiguous_checkpointing,
        "number_checkpoints": num_checkpoints, "cpu_checkpointing": checkpoint_in_cpu,
        "synchronize_checkpoint_boundary": synchronize, "profile": profile,
    }
    new = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    _validate(new)
    group = _group_of(mpu_) if mpu_ is not None else _group
    release_contiguous_buffers()
    _settings, _group, _configured = new, group, True
    if mpu_ is not None:
        tp_random.set_mpu(mpu_)
    size = group.size if group is not None else 1
    log_dist(f"activation checkpointing: partition_activations={new.partition_activations} (over {size} tensor "
             f"ranks), cpu_checkpointing={new.cpu_checkpointing}, contiguous_memory_optimization="
             f"{new.contiguous_memory_optimization} ({new.number_checkpoints} checkpoints), synchronize="
             f"{new.synchronize_checkpoint_boundary}, profile={new.profile}", ranks=[0])


def _validate(s: Settings) -> None:
    if s.contiguous_memory_optimization and not s.partition_activations:
        raise CheckpointingConfigError(
            "activation_checkpointing.contiguous_memory_optimization needs partition_activations: the contiguous "
            "buffers hold partitioned activations. Set partition_activations to true, or "
            "contiguous_memory_optimization to false")
    if s.contiguous_memory_optimization and not s.number_checkpoints:
        raise CheckpointingConfigError(
            "activation_checkpointing.contiguous_memory_optimization needs number_checkpoints (how many checkpoints "
            "one forward stores, usually the number of layers) to size its buffers; set it, or pass "
            "num_checkpoints= to configure()")


def set_num_layers(nlayers: int) -> None:
    """Set ``number_checkpoints`` (DeepSpeed's ``set_num_layers``)."""
    global _settings
    _settings = replace(_settings, number_checkpoints=nlayers)


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    """Turn ``partition_activations`` on or off (DeepSpeed's function of that name)."""
    global _settings
    new = replace(_settings, partition_activations=bool(partition_activation))
    _validate(new)
    _settings = new


def _reset_for_tests() -> None:
    """Back to the unconfigured defaults (tests only; DeepSpeed has no public way to unconfigure)."""
    global _settings, _configured, _group
    _settings, _configured, _group = Settings(), False, None
    tp_random.set_mpu(None)
