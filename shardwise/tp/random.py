"""Random-number streams for tensor parallelism: DeepSpeed/Megatron's ``get_cuda_rng_tracker`` semantics, for
every accelerator (the "cuda" in the names is historical; the states are ``get_accelerator()``'s generator).

Two streams per rank:
* the **default** generator, seeded identically on every tensor-parallel rank of a group, drives dropout on
  activations that are *replicated* across tensor ranks (after a row-parallel all-reduce), so every rank drops
  the same elements and the replicas stay identical;
* the **model-parallel** stream (``seed + 2718 + tp_rank``), entered with ``with get_cuda_rng_tracker().fork():``,
  drives dropout on activations that are *split* across tensor ranks (per-head attention probabilities, sequence
  shards), so every shard gets an independent mask, as the full model would.

The tracker is process-wide, as in DeepSpeed, because user code reaches it by name
(``deepspeed.checkpointing.get_cuda_rng_tracker()``); activation checkpointing saves and restores its states so
recomputed dropout matches.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from shardwise.accelerator import get_accelerator
from shardwise.comm.foreign_mpu import tensor_rank_of
from shardwise.common.logging import log_dist

MODEL_PARALLEL_RNG = "model-parallel-rng"
_MODEL_PARALLEL_RNG_TRACKER_NAME = MODEL_PARALLEL_RNG  # DeepSpeed's name for it
_SEED_OFFSET = 2718  # Megatron's offset between the data-parallel seed and tensor rank 0's stream

_mpu: Any = None  # set by activation_checkpointing.configure(mpu_): where the tensor rank comes from


class RNGStatesTracker:
    """Named generator states that can be entered (``fork``) and left, resuming where they stopped."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        """Forget every stream."""
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A shallow copy of ``{name: state}`` (states are replaced, never mutated, so this is a snapshot)."""
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore a snapshot taken by ``get_states``."""
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed``, leaving the default generator untouched."""
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} is already used by another RNG stream; give each stream its own seed")
        if name in self.states_:
            raise ValueError(f"RNG stream {name!r} already exists; call reset() first to re-seed it")
        acc = get_accelerator()
        saved = acc.get_rng_state()
        acc.manual_seed(seed)
        self.states_[name] = acc.get_rng_state()
        acc.set_rng_state(saved)
        self.seeds_.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block on stream ``name``; on exit save where it got to and restore the default generator."""
        if name not in self.states_:
            raise KeyError(f"RNG stream {name!r} was never added: call model_parallel_cuda_manual_seed(seed) (or "
                           f"get_cuda_rng_tracker().add({name!r}, seed)) after initializing the process grid")
        acc = get_accelerator()
        saved = acc.get_rng_state()
        acc.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = acc.get_rng_state()
            acc.set_rng_state(saved)

    def has(self, name: str = MODEL_PARALLEL_RNG) -> bool:
        """Whether stream ``name`` exists."""
        return name in self.states_


CudaRNGStatesTracker = RNGStatesTracker  # DeepSpeed's class name

_TRACKER = RNGStatesTracker()


def get_cuda_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (DeepSpeed's and Megatron's name)."""
    return _TRACKER


get_rng_tracker = get_cuda_rng_tracker


def set_mpu(mpu: Any) -> None:
    """Remember the model-parallel unit the tensor rank is read from (``activation_checkpointing.configure``)."""
    global _mpu
    _mpu = mpu


def tensor_parallel_rank(mpu: Any = None) -> int:
    """This rank's tensor-parallel index from an mpu (Megatron, DeepSpeed pipe-grid or shardwise names)."""
    mpu = mpu if mpu is not None else _mpu
    return 0 if mpu is None else tensor_rank_of(mpu)


def model_parallel_cuda_manual_seed(seed: int, tp_rank: int | None = None) -> None:
    """Seed the default generator with ``seed`` (same on every tensor rank) and the model-parallel stream with
    ``seed + 2718 + tp_rank`` (different per tensor rank). ``tp_rank`` defaults to the configured mpu's.

    Call it once after the process grid exists and instead of ``manual_seed`` (it resets the tracker).
    """
    if tp_rank is None and _mpu is None and dist.is_initialized() and dist.get_world_size() > 1:
        log_dist("model_parallel_cuda_manual_seed: no mpu configured, so every rank seeds the model-parallel stream "
                 "as tensor rank 0; call shardwise.checkpointing.configure(mpu) first or pass tp_rank=",
                 ranks=[0], level=logging.WARNING)
    rank = tensor_parallel_rank() if tp_rank is None else int(tp_rank)
    _TRACKER.reset()
    get_accelerator().manual_seed(seed)
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _SEED_OFFSET + rank)
    log_dist(f"RNG seeds: default {seed} (shared by tensor ranks), model-parallel {seed + _SEED_OFFSET} + tp rank",
             ranks=[0])


def model_parallel_reconfigure_tp_seed(seed: int, tp_rank: int | None = None) -> None:
    """Re-seed only the model-parallel stream (DeepSpeed's ``model_parallel_reconfigure_tp_seed``)."""
    rank = tensor_parallel_rank() if tp_rank is None else int(tp_rank)
    with _TRACKER.fork():
        get_accelerator().manual_seed(seed + _SEED_OFFSET + rank)


def fork_if(split: bool) -> contextlib.AbstractContextManager:
    """``tracker.fork()`` when the activation is split across tensor ranks and the stream exists, else a no-op."""
    return _TRACKER.fork() if split and _TRACKER.has() else contextlib.nullcontext()
