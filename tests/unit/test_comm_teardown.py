"""Teardown at exit (comm/teardown.py, [Note: teardown abort]): after ``init_distributed`` a script that ends
normally has its process groups destroyed while the interpreter is whole (so gloo's threads cannot abort the exit
with SIGABRT); one that ends with an uncaught exception keeps them (destroying waits for pending collectives).
Each case runs a one-rank job in a fresh interpreter and reports, from an exit hook that runs after ours, whether
torch.distributed was still up."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    import torch, torch.distributed as dist
    atexit.register(lambda: print("UP_AT_EXIT", dist.is_initialized(), flush=True))  # runs after shardwise's hook
    import shardwise
    from shardwise import comm
    shardwise.init_distributed(dist_backend="gloo")
    comm.all_reduce(torch.ones(3))
    if sys.argv[1] == "raise":
        raise RuntimeError("the script failed")
    if sys.argv[1] == "destroyed":
        comm.destroy_process_group()
    """
)


@pytest.mark.parametrize(
    ("ending", "returncode", "up_at_exit"),
    [("normal", 0, False), ("destroyed", 0, False), ("raise", 1, True)],
)
def test_process_group_is_destroyed_at_a_clean_exit_only(ending, returncode, up_at_exit, monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
                 "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ending], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == returncode, proc.stderr
    assert f"UP_AT_EXIT {up_at_exit}" in proc.stdout, proc.stdout + proc.stderr


def test_exit_settles_gloo_workers_even_when_the_script_destroyed_the_groups(monkeypatch):
    """A script that calls destroy_process_group() itself (benchmarks/train_worker.py does) still gets the settle
    pause: group objects an engine still references keep their workers until finalisation."""
    from shardwise.comm import teardown

    slept = []
    monkeypatch.setattr(teardown.time, "sleep", slept.append)
    monkeypatch.setattr(teardown.dist, "is_initialized", lambda: False)
    monkeypatch.setitem(teardown._state, "uncaught", False)
    teardown._destroy_at_exit()
    assert slept == [teardown.SETTLE_SECONDS]
    monkeypatch.setitem(teardown._state, "uncaught", True)  # a failed script exits at once
    teardown._destroy_at_exit()
    assert slept == [teardown.SETTLE_SECONDS]
