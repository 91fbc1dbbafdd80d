"""``init_distributed``: start torch.distributed once, from whatever launcher started this process."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from shardwise.accelerator import get_accelerator
from shardwise.comm import teardown
from shardwise.comm.env import LaunchEnv, discover
from shardwise.comm.timeouts import DEFAULT_TIMEOUT, resolve_timeout  # noqa: F401 - DEFAULT_TIMEOUT: public here

logger = logging.getLogger("shardwise.comm")

_launch_env: LaunchEnv | None = None


def init_distributed(
    dist_backend: str | None = None,
    auto_mpi_discovery: bool = True,
    distributed_port: int = 29500,
    verbose: bool = True,
    timeout: datetime.timedelta | float | None = None,
    init_method: str | None = None,
    dist_init_required: bool | None = None,
    config: Any = None,
    rank: int = -1,
    world_size: int = -1,
) -> None:
    """Initialise torch.distributed (idempotent), as ``deepspeed.init_distributed`` does.

    Rank and world size come from the arguments, else from the launcher's environment (torchrun / shardwise,
    OpenMPI, MPICH, SLURM; see ``comm/env.py``), else the process is a one-rank job on loopback. The backend
    defaults to the accelerator's (gloo on cpu, nccl on cuda, hccl on hpu). ``timeout`` (a timedelta or seconds;
    default SHARDWISE_COMM_TIMEOUT seconds, DEEPSPEED_TIMEOUT minutes, or 30 minutes: ``comm/timeouts.py``) bounds
    every collective: one that does not complete in time raises ``CollectiveError`` naming it and the ranks that
    did not arrive. The process groups are destroyed at a clean exit (``comm/teardown.py``).
    """
    global _launch_env
    teardown.register()
    if dist.is_initialized():
        if _launch_env is None:
            _launch_env = _env_from_initialized()
        check_world_matches(dist.get_world_size())
        return
    if dist_init_required is False:
        raise RuntimeError(
            "dist_init_required=False but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group() first, or pass dist_init_required=None/True"
        )
    # auto_mpi_discovery=False (accelerate passes it) only turns off the MPI/SLURM probing: torchrun's and our
    # launcher's RANK/WORLD_SIZE/MASTER_* are always read, or every rank would silently become its own world.
    env = discover(os.environ if auto_mpi_discovery else _torchrun_only(os.environ), default_port=distributed_port)
    if rank >= 0 and world_size > 0:
        env = LaunchEnv(rank, world_size, env.local_rank, env.local_world_size, env.master_addr, env.master_port,
                        "arguments")
    for name, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank),
                        ("LOCAL_WORLD_SIZE", env.local_world_size), ("MASTER_ADDR", env.master_addr),
                        ("MASTER_PORT", env.master_port)):
        os.environ.setdefault(name, str(value))
    accelerator = get_accelerator()
    backend = dist_backend or default_backend(accelerator.communication_backend_name())
    timeout, _ = resolve_timeout(timeout)
    if accelerator.device_name() != "cpu":
        accelerator.set_device(env.local_rank)
    if verbose and env.rank == 0:
        logger.info("initialising torch.distributed: backend=%s world=%d source=%s master=%s:%s",
                    backend, env.world_size, env.source, env.master_addr, env.master_port)
    dist.init_process_group(backend=backend, init_method=init_method or "env://", rank=env.rank,
                            world_size=env.world_size, timeout=timeout)
    _launch_env = env
    check_world_matches(dist.get_world_size())
    if accelerator.device_name() == "cpu" and env.local_rank == 0:
        warn_if_oversubscribed(env.local_world_size)


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _torchrun_only(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: environ[name] for name in _TORCHRUN_VARS if name in environ}


def launcher_world_size(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """The world size the launcher environment announces and the variable that says it (torchrun / shardwise
    ``WORLD_SIZE``, OpenMPI, MPICH / Intel MPI, SLURM), or ``None`` when no launcher set one."""
    for name, rank_name in (("WORLD_SIZE", "RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                            ("PMI_SIZE", "PMI_RANK"), ("SLURM_NTASKS", "SLURM_PROCID")):
        value = environ.get(name, "").strip()
        if value.isdigit() and (name == "WORLD_SIZE" or rank_name in environ):
            return int(value), name
    return None


def check_world_matches(group_size: int, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a job split into one-rank worlds: the launcher announced several ranks but this process's
    default group has one (each rank would train alone on unsharded data and write the same files)."""
    announced = launcher_world_size(os.environ if environ is None else environ)
    if announced is None:
        return
    size, name = announced
    if size > 1 and group_size == 1:
        raise RuntimeError(
            f"the launcher started {size} ranks ({name}={size}) but torch.distributed's default group has 1 rank: "
            "every rank would train alone on unsharded data. Initialise with the launcher's environment "
            "(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or unset WORLD_SIZE for a single-process run"
        )


def default_backend(accelerator_backend: str) -> str:
    """The backend string for ``init_process_group`` when the user names none.

    On CUDA the default group is ``cpu:gloo,cuda:nccl``: nccl for device tensors, and gloo for the few CPU tensors
    shardwise exchanges by design (step-log scalars, checkpoint fingerprints and full-value gathers, pipeline
    metadata), which nccl alone refuses (``No backend type associated with device type cpu``). Sub-groups inherit it.
    Other accelerators' backends are used as they are. ``dist_backend="nccl"`` still gives plain nccl.
    """
    if accelerator_backend == "nccl":
        return "cpu:gloo,cuda:nccl"
    return accelerator_backend


def oversubscription_hint(local_ranks: int) -> str | None:
    """A warning when this node's CPU ranks, one torch thread pool each, ask for more threads than usable cores."""
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_ranks <= 1 or threads <= 1 or local_ranks * threads <= cores:
        return None
    return (f"{local_ranks} ranks x {threads} threads on {cores} cores: the ranks oversubscribe the CPU, so "
            "compute and every collective wait for descheduled threads (several times slower); set "
            f"OMP_NUM_THREADS={max(1, cores // local_ranks)} (the shardwise launcher does when it is unset) or "
            "launch with --bind_cores_to_rank")


def warn_if_oversubscribed(local_ranks: int) -> None:
    """Log :func:`oversubscription_hint` once, if there is one."""
    hint = oversubscription_hint(local_ranks)
    if hint:
        logger.warning(hint)


def _env_from_initialized() -> LaunchEnv:
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    return LaunchEnv(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)), local_world,
                     os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 0) or 0),
                     "preinitialised")


def launch_env() -> LaunchEnv:
    """The rank/world/node facts this process was started with (after ``init_distributed``)."""
    global _launch_env
    if _launch_env is None:
        _launch_env = _env_from_initialized() if dist.is_initialized() else discover(os.environ)
    return _launch_env


def is_initialized() -> bool:
    """Whether torch.distributed is up."""
    return dist.is_initialized()


def get_rank(group: Any = None) -> int:
    """Global rank (or rank inside ``group``); 0 before initialisation."""
    if not dist.is_initialized():
        return 0
    return dist.get_rank() if group is None else dist.get_rank(getattr(group, "torch_group", group))


def get_world_size(group: Any = None) -> int:
    """World size (or size of ``group``); 1 before initialisation."""
    if not dist.is_initialized():
        return 1
    if group is None:
        return dist.get_world_size()
    return getattr(group, "size", None) or dist.get_world_size(group)


def get_local_rank() -> int:
    """Rank of this process on its node."""
    return launch_env().local_rank


def destroy_process_group() -> None:
    """Tear torch.distributed down (idempotent)."""
    global _launch_env
    if dist.is_initialized():
        dist.destroy_process_group()
    _launch_env = None
