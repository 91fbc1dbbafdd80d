"""Faults the launcher must name correctly and clean up after, with real launches (CPU, gloo): a rank killed by
SIGKILL (as the OOM killer does) and the launcher itself killed by SIGKILL. Every wait is bounded; nothing here
measures time (docs/reliability.md has the measured times)."""

import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

SCRIPTS = Path(__file__).parent / "scripts"
CLI = [sys.executable, "-m", "shardwise.launcher.cli"]
LIVENESS_BOUND_S = 60  # generous: how long processes may take to disappear before the test calls them survivors

pytestmark = pytest.mark.slow


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_ready(proc: subprocess.Popen, ranks: int) -> None:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    ready: set[str] = set()
    deadline = time.monotonic() + LIVENESS_BOUND_S
    while len(ready) < ranks:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        if line.startswith("READY"):
            ready.add(line.split()[1])


def test_a_rank_killed_by_sigkill_is_named_with_its_signal(run_cli, tmp_path, free_port, assert_no_survivors):
    """The OOM killer's way: rank 1 dies by SIGKILL; the report blames rank 1 (not the rank the launcher then
    stopped with SIGTERM) and the launcher exits 128 + 9, as a shell reports a SIGKILLed command."""
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = run_cli(
        "--num_gpus", "2", "--master_port", str(free_port()), str(SCRIPTS / "hold.py"),
        "--pid_dir", str(pids), "--sigkill_rank", "1", timeout=LIVENESS_BOUND_S,
    )  # fmt: skip
    assert proc.returncode == 137, proc.stderr
    summary = [line for line in proc.stderr.splitlines() if "ERROR: rank" in line]
    assert summary, proc.stderr
    assert "rank 1 (local rank 1 on node 0" in summary[0], proc.stderr
    assert "failed with signal SIGKILL (killed from outside the job, possibly by the out-of-memory killer" in summary[0]
    assert "rank 0 ended with signal SIGTERM" in proc.stderr.split(summary[0], 1)[1]
    assert_no_survivors(pids, expected_files=2)


def test_sigkill_of_the_launcher_ends_every_rank_and_what_they_started(launch_env, tmp_path):
    """``kill -9`` of the launcher runs none of its cleanup; the ranks, their children and their keepers must still
    go (no --master_port: the single-node free-port path is exercised too)."""
    pids = tmp_path / "pids"
    pids.mkdir()
    cmd = [*CLI, "--num_gpus", "2", str(SCRIPTS / "hold.py"), "--pid_dir", str(pids)]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    job: list[int] = []
    try:
        _wait_ready(proc, 2)
        recorded = [int(p) for f in sorted(pids.glob("rank*.pids")) for p in f.read_text().split()]
        job = [pid for pid in recorded if pid != proc.pid]  # each rank, its child and its parent (a keeper)
        assert _alive(job) == job
        proc.kill()
        proc.wait(timeout=LIVENESS_BOUND_S)
        deadline = time.monotonic() + LIVENESS_BOUND_S
        while _alive(job) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(job), f"processes of the job outlived its launcher: {_alive(job)}"
    finally:
        for pid in _alive(job):  # don't leak them into the rest of the session
            psutil.Process(pid).kill()
        if proc.poll() is None:
            proc.kill()


def test_a_collective_timeout_names_the_rank_that_did_not_arrive(run_cli, launch_env, free_port):
    """Rank 2 never reaches the second all-reduce; with SHARDWISE_COMM_TIMEOUT=3 the waiting ranks fail, and the
    launcher's report quotes the error naming rank 2 (found through the store), the collective and its group."""
    env = {**launch_env, "SHARDWISE_COMM_TIMEOUT": "3", "SHARDWISE_ACCELERATOR": "cpu"}
    proc = run_cli(
        "--num_gpus", "3", "--master_port", str(free_port()), str(SCRIPTS / "late.py"), "--late_rank", "2",
        env=env, timeout=LIVENESS_BOUND_S * 2,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    summary = [line for line in proc.stderr.splitlines() if "ERROR: rank" in line]
    assert summary and ("rank 0 (local" in summary[0] or "rank 1 (local" in summary[0]), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "CollectiveError" in line]
    assert errors, proc.stderr
    assert "all_reduce #2 on group Group(world, ranks=[0, 1, 2]) timed out" in errors[-1]
    assert "Rank 2 did not arrive (no collective of this group timed out there within 2 s" in errors[-1]
    assert "ranks 0, 1 reached all_reduce #2" in errors[-1]


def test_sigkill_of_a_multi_node_launcher_stops_its_runners(launch_env, tmp_path):
    """Through the multi-node path (the CLI supervises one ``ssh`` per node; a stand-in ``ssh`` runs the remote
    command here): ``kill -9`` of the CLI sends SIGTERM to its runner processes, whose launchers then stop their
    ranks as on Ctrl-C."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_ssh = bindir / "ssh"
    fake_ssh.write_text('#!/bin/bash\n# test stand-in for ssh: run the remote command here\nexec bash -c "${@: -1}"\n')
    fake_ssh.chmod(0o755)
    env = {**launch_env, "PATH": f"{bindir}:{launch_env['PATH']}"}
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    cmd = [*CLI, "-H", "hostfile", "--launcher", "ssh", "--master_addr", "127.0.0.1", str(SCRIPTS / "hold.py"),
           "--pid_dir", str(pids)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    job: list[int] = []
    try:
        _wait_ready(proc, 2)
        job = [int(p) for f in sorted(pids.glob("rank*.pids")) for p in f.read_text().split()]
        job += [child.pid for child in psutil.Process(proc.pid).children()]  # the two "ssh" (then launch) processes
        assert len(job) == 8 and _alive(job) == job
        proc.kill()
        proc.wait(timeout=LIVENESS_BOUND_S)
        deadline = time.monotonic() + LIVENESS_BOUND_S
        while _alive(job) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(job), f"processes of the job outlived its launcher: {_alive(job)}"
    finally:
        for pid in _alive(job):
            psutil.Process(pid).kill()
        if proc.poll() is None:
            proc.kill()
