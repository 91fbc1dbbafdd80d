"""Rank/world discovery from torchrun, OpenMPI, MPICH and SLURM environments (pure)."""

from __future__ import annotations

import pytest

from shardwise.comm.env import discover, first_slurm_host


def test_torchrun_variables() -> None:
    env = discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "node0", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 2)
    assert (env.master_addr, env.master_port, env.source) == ("node0", 1234, "torchrun")


def test_deepspeed_local_size_alias() -> None:
    env = discover({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_SIZE": "4"})
    assert env.local_world_size == 4 and env.master_addr == "127.0.0.1" and env.master_port == 29500


def test_openmpi_variables() -> None:
    env = discover({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "10.0.0.1"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.source) == (5, 8, 1, 4, "openmpi")


def test_openmpi_without_master_addr_explains_the_fix() -> None:
    with pytest.raises(ValueError, match=r"OpenMPI.*MASTER_ADDR is not set.*mpirun -x MASTER_ADDR"):
        discover({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


def test_mpich_variables() -> None:
    env = discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
                    "MASTER_ADDR": "h"})
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 2, 1, "mpich")


def test_slurm_variables_and_master_from_nodelist() -> None:
    env = discover({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                    "SLURM_NTASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[003-004]"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)
    assert env.master_addr == "gpu003" and env.source == "slurm"


@pytest.mark.parametrize("nodelist,first", [("a1", "a1"), ("gpu[003-005,9],cpu1", "gpu003"), ("n[7]", "n7"),
                                            ("x-1,x-2", "x-1")])
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_no_launcher_means_a_single_process_on_loopback() -> None:
    env = discover({})
    assert (env.rank, env.world_size, env.source, env.master_addr) == (0, 1, "single-process", "127.0.0.1")
    assert env.master_port > 0


def test_non_integer_rank_is_reported() -> None:
    with pytest.raises(ValueError, match=r"RANK='x' is not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


def test_oversubscription_hint_names_the_fix(monkeypatch) -> None:
    import torch

    from shardwise.comm.init import oversubscription_hint

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    hint = oversubscription_hint(2)
    assert hint is not None and "2 ranks x 2 threads on 2 cores" in hint and "OMP_NUM_THREADS=1" in hint
    assert oversubscription_hint(1) is None  # one rank may use every core
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert oversubscription_hint(2) is None


@pytest.mark.parametrize(("accelerator_backend", "expected"),
                         [("nccl", "cpu:gloo,cuda:nccl"), ("gloo", "gloo"), ("hccl", "hccl"), ("ccl", "ccl")])
def test_default_backend_gives_cuda_jobs_a_gloo_side_for_cpu_tensors(accelerator_backend, expected) -> None:
    from shardwise.comm.init import default_backend

    assert default_backend(accelerator_backend) == expected
