"""Where this process sits in the job, read from the launcher's environment (pure; no torch.distributed).

Understands torchrun / the shardwise launcher (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), OpenMPI
(``OMPI_COMM_WORLD_*``), MPICH / Intel MPI (``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``) and SLURM
(``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODELIST``). With none of them, the process is a
single-rank job rendezvousing on loopback.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    """Rank, world and rendezvous address of this process, and which launcher described them."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "openmpi", "mpich", "slurm", or "single-process"


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as exc:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc
    return default


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"gpu[003-005,9],cpu1"`` -> ``"gpu003"``."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (used for single-process rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def discover(env: Mapping[str, str], default_port: int = 29500) -> LaunchEnv:
    """Read rank and world from whichever launcher started this process."""
    port = _int(env, "MASTER_PORT", default=default_port)
    addr = env.get("MASTER_ADDR", "")
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world)
        return LaunchEnv(
            _int(env, "RANK"), world, _int(env, "LOCAL_RANK", default=0), local_world,
            addr or "127.0.0.1", port, "torchrun",
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        _require_master(env, "OpenMPI")
        return LaunchEnv(
            _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1), addr, port, "openmpi",
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        _require_master(env, "MPICH / Intel MPI")
        return LaunchEnv(
            _int(env, "PMI_RANK"), _int(env, "PMI_SIZE"), _int(env, "MPI_LOCALRANKID", default=0),
            _int(env, "MPI_LOCALNRANKS", default=1), addr, port, "mpich",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if not addr:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise ValueError("SLURM environment without MASTER_ADDR or SLURM_NODELIST: set MASTER_ADDR")
            addr = first_slurm_host(nodelist)
        ntasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local_world = int(ntasks_per_node) if ntasks_per_node.isdigit() else _int(env, "SLURM_NTASKS")
        return LaunchEnv(
            _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID", default=0),
            local_world, addr, port, "slurm",
        )
    return LaunchEnv(0, 1, 0, 1, addr or "127.0.0.1", _int(env, "MASTER_PORT", default=0) or free_port(),
                     "single-process")


def _require_master(env: Mapping[str, str], launcher: str) -> None:
    if not env.get("MASTER_ADDR"):
        raise ValueError(
            f"{launcher} environment detected but MASTER_ADDR is not set: export it on every rank "
            "(mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500), or launch with `shardwise --launcher openmpi`, "
            "which does this for you"
        )
