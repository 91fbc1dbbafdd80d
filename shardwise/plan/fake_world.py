"""``FakeWorld``: this process becomes "rank r of N" with no other process and no memory behind its tensors.

Two torch facilities make that possible: the fake process-group backend (``torch.testing._internal.distributed.
fake_pg``: every collective returns at once and moves nothing, for any world size) and the meta device (tensors
with a shape and a dtype but no storage). Inside a ``FakeWorld`` the engine's own build path runs unchanged:
``Topology`` creates every process group of a 1,024-rank grid, ZeRO flattens and partitions meta parameters,
collectives are issued (and recorded by the comms log with their true sizes) without moving a byte.

What the context changes, and restores on exit:
* torch.distributed: a fake process group for (``rank``, ``world_size``), destroyed on exit. Planning refuses to
  start inside a process whose torch.distributed is already up (it would replace the job's real group).
* the accelerator: ``MetaAccelerator`` (device ``meta``), so ``get_accelerator().device()`` places the model on
  the meta device. The previous choice comes back on exit.
* host allocations: the engine puts offloaded state on ``cpu`` explicitly; ``_HostOnMeta`` redirects explicit
  ``device="cpu"`` allocations and copies to ``meta``, so a plan of 405B parameters with ZeRO-Offload allocates
  nothing either. (Tensors created without a device, e.g. small headers, stay real.)
* object collectives (``all_gather_object``, ``broadcast_object_list``): the fake backend moves no bytes, so a
  gathered object would be garbage; inside the context every peer answers with this rank's own object, which is
  what the engine's consistency checks expect of an SPMD program (every rank builds the same layout);
* the comms log (cleared on entry, its previous totals restored on exit), activation-checkpointing settings and
  the CPU random state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from shardwise import accelerator as accel
from shardwise.accelerator.cpu import CpuAccelerator
from shardwise.comm import COMMS_LOG


class PlanEnvironmentError(RuntimeError):
    """Planning cannot run in this process (e.g. torch.distributed is already initialised)."""


class MetaAccelerator(CpuAccelerator):
    """The CPU accelerator, except that the engine's device is ``meta``: shapes without storage."""

    _name = "meta"
    _communication_backend = "fake"

    def device(self, device_index: int | None = None) -> torch.device:
        return torch.device("meta")

    def device_name(self, device_index: int | None = None) -> str:
        return "meta"

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return False

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.is_meta


def _is_cpu(device: Any) -> bool:
    if isinstance(device, (str, torch.device)):
        try:
            return torch.device(device).type == "cpu"
        except RuntimeError:
            return False
    return False


class _HostOnMeta(TorchFunctionMode):
    """Explicit ``device="cpu"`` allocations and ``.to("cpu")`` copies land on ``meta`` instead."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if _is_cpu(kwargs.get("device")):
            kwargs["device"] = torch.device("meta")
            kwargs.pop("pin_memory", None)
        elif func is torch.Tensor.to and len(args) > 1 and _is_cpu(args[1]):
            args = (args[0], torch.device("meta"), *args[2:])
        return func(*args, **kwargs)


def _snapshot_checkpointing() -> tuple:
    from shardwise.activation_checkpointing import settings

    return settings._settings, settings._configured, settings._group


def _restore_checkpointing(saved: tuple) -> None:
    from shardwise.activation_checkpointing import settings
    from shardwise.tp import random as tp_random

    settings._settings, settings._configured, settings._group = saved
    if not saved[1]:
        tp_random.set_mpu(None)


def _gather_own_object(object_list: list, obj: Any, group: Any = None) -> None:
    for i in range(len(object_list)):
        object_list[i] = obj


def _broadcast_own_objects(object_list: list, src: int | None = None, group: Any = None, device: Any = None,
                           group_src: int | None = None) -> None:
    return None


@contextlib.contextmanager
def _own_object_collectives() -> Iterator[None]:
    saved = dist.all_gather_object, dist.broadcast_object_list
    dist.all_gather_object, dist.broadcast_object_list = _gather_own_object, _broadcast_own_objects
    try:
        yield
    finally:
        dist.all_gather_object, dist.broadcast_object_list = saved


@contextlib.contextmanager
def fake_world(rank: int, world_size: int) -> Iterator[None]:
    """Run the body as global rank ``rank`` of ``world_size`` (fake collectives, meta device); see the module doc."""
    if dist.is_initialized():
        raise PlanEnvironmentError(
            "torch.distributed is already initialised in this process; plan layouts in a process of their own "
            "(the `shardwise-plan` command, or a script that does not start a process group)"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} ranks")
    import torch.testing._internal.distributed.fake_pg as fake_pg

    previous_accel = accel._current
    saved_log = dict(COMMS_LOG.stats)
    saved_ckpt = _snapshot_checkpointing()
    rng = torch.get_rng_state()
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world_size)
    accel.set_accelerator(MetaAccelerator())
    COMMS_LOG.reset()
    try:
        with _HostOnMeta(), _own_object_collectives():
            yield
    finally:
        from shardwise.comm import destroy_process_group

        destroy_process_group()
        accel.set_accelerator(previous_accel)
        COMMS_LOG.reset()
        COMMS_LOG.stats.update(saved_log)
        _restore_checkpointing(saved_ckpt)
        torch.set_rng_state(rng)
