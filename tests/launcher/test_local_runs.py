"""Real launches on this machine (CPU, gloo): success, rank environment, env files, loopback-only
rendezvous, per-rank logs, two nodes on loopback, a failing rank, and Ctrl-C. Each starts real
processes (~2-4 s); every wait is bounded."""

import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"
CLI = [sys.executable, "-m", "shardwise.launcher.cli"]

pytestmark = pytest.mark.slow


def test_two_local_ranks_env_and_env_file(run_cli, tmp_path, free_port, parse_rank_info, launch_env):
    (tmp_path / ".deepspeed_env").write_text("# cluster settings\nSW_TEST_FROM_ENV_FILE=from the file\n")
    env = {**launch_env, "CHECK_LISTEN": "1"}
    port = free_port()
    proc = run_cli(
        "--num_gpus", "2", "--master_port", str(port), str(SCRIPTS / "rank_env.py"), "--user_flag", "x y", env=env
    )
    assert proc.returncode == 0, proc.stderr
    rows = parse_rank_info(proc.stdout)
    assert [r["rank"] for r in rows] == ["0", "1"]
    for i, row in enumerate(rows):
        assert row["local_rank"] == str(i) and row["arg_local_rank"] == str(i)  # DeepSpeed's --local_rank=N
        assert row["dist_rank"] == str(i)
        assert row["world_size"] == row["local_world_size"] == row["local_size"] == "2"
        assert row["cross_rank"] == "0"
        assert row["master_addr"] == "127.0.0.1"
        assert row["allreduce"] == "3"
        assert row["extra"] == "--user_flag|x y"  # one argument with a space stays one argument
        assert row["from_env_file"] == "from the file"
        assert row["omp_num_threads"] == "1"  # the user's setting (launch_env) is kept
    assert proc.stdout.count("SW_TEST_FROM_ENV_FILE") == 0
    # the launcher (rendezvous store) and the ranks (gloo) listen on loopback only
    listening = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("LISTEN ")]
    assert f"127.0.0.1:{port}" in listening
    assert all(addr.startswith("127.") for addr in listening), listening


def test_ranks_get_their_share_of_the_cores_as_omp_threads(run_cli, free_port, parse_rank_info, launch_env):
    """Without OMP_NUM_THREADS, each of the node's ranks gets usable cores / ranks (at least 1), not one OpenMP pool
    per rank over every core (which oversubscribes the machine)."""
    env = {k: v for k, v in launch_env.items() if k != "OMP_NUM_THREADS"}
    proc = run_cli("--num_gpus", "2", "--master_port", str(free_port()), str(SCRIPTS / "rank_env.py"), env=env)
    assert proc.returncode == 0, proc.stderr
    expected = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert [r["omp_num_threads"] for r in parse_rank_info(proc.stdout)] == [expected, expected]
    assert f"OMP_NUM_THREADS={expected} for each of the 2 ranks" in proc.stderr + proc.stdout


def test_each_rank_log_and_module(run_cli, tmp_path, free_port, parse_rank_info, launch_env):
    logs = tmp_path / "logs"
    env = {**launch_env, "PYTHONPATH": str(SCRIPTS)}
    proc = run_cli(
        "--num_gpus", "2", "--master_port", str(free_port()), "--enable_each_rank_log", str(logs),
        "--module", "rank_env", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "RANKINFO" not in proc.stdout  # output went to the per-rank files
    files = sorted(logs.glob("*_rank*.log"))
    assert [f.name.split("_", 1)[1] for f in files] == ["rank0.log", "rank1.log"]
    for i, path in enumerate(files):
        (row,) = parse_rank_info(path.read_text())
        assert row["rank"] == str(i) and row["arg_local_rank"] == str(i)


def test_two_nodes_on_loopback_from_dry_run(run_cli, tmp_path, free_port, parse_rank_info, launch_env):
    """Build the per-node commands with --dry_run (ssh runner) and run each node's command locally."""
    (tmp_path / "hostfile").write_text("node-a slots=2\nnode-b slots=2\n")
    port = free_port()
    dry = run_cli(
        "-H", "hostfile", "--launcher", "ssh", "--master_addr", "127.0.0.1", "--master_port", str(port),
        "--no_local_rank", "--dry_run", str(SCRIPTS / "rank_env.py"),
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.strip().splitlines()
    assert [shlex.split(line)[:2] for line in lines] == [["ssh", "node-a"], ["ssh", "node-b"]]
    nodes = [
        subprocess.Popen(
            ["bash", "-c", shlex.split(line)[-1]],
            env=launch_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in lines
    ]
    outputs = [node.communicate(timeout=60) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err for _, err in outputs]
    rows = parse_rank_info(outputs[0][0] + outputs[1][0])
    assert [(r["rank"], r["local_rank"], r["cross_rank"]) for r in rows] == [
        ("0", "0", "0"), ("1", "1", "0"), ("2", "0", "1"), ("3", "1", "1"),
    ]  # fmt: skip
    assert {r["world_size"] for r in rows} == {"4"}  # 2 nodes x 2 ranks
    assert {r["allreduce"] for r in rows} == {"10"}
    assert {r["arg_local_rank"] for r in rows} == {"None"}  # --no_local_rank


def test_failing_rank_stops_the_job_and_is_named(run_cli, tmp_path, free_port, assert_no_survivors):
    pids = tmp_path / "pids"
    pids.mkdir()
    # hold.py's other rank sleeps 120 s: that it was stopped (SIGTERM) when rank 1 failed is checked below, by
    # its end signal, not by a clock; the timeout only guards against a hang
    proc = run_cli(
        "--num_gpus", "2", "--master_port", str(free_port()), str(SCRIPTS / "hold.py"),
        "--pid_dir", str(pids), "--fail_rank", "1", timeout=90,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    summary = [line for line in proc.stderr.splitlines() if "ERROR: rank" in line]
    assert summary and "rank 1 (local rank 1 on node 0" in summary[0] and "exit code 1" in summary[0], proc.stderr
    tail = proc.stderr.split(summary[0], 1)[1]
    assert "RuntimeError: boom from rank 1" in tail  # the rank's own error, quoted in the summary
    assert "rank 0 ended with signal SIGTERM" in tail
    assert_no_survivors(pids, expected_files=2)  # rank 1's orphaned child included


def test_sigint_stops_every_rank(launch_env, tmp_path, free_port, assert_no_survivors):
    pids = tmp_path / "pids"
    pids.mkdir()
    cmd = [*CLI, "--num_gpus", "2", "--master_port", str(free_port()), "--save_pid", str(SCRIPTS / "hold.py")]
    cmd += ["--pid_dir", str(pids)]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    ready = set()
    deadline = time.monotonic() + 120  # a hang guard only: two ranks importing torch on a busy machine
    while len(ready) < 2:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        if line.startswith("READY"):
            ready.add(line.split()[1])
    pid_file = Path(tempfile.gettempdir()) / f"{proc.pid}.deepspeed"  # --save_pid, DeepSpeed's name
    assert pid_file.read_text() == str(proc.pid)  # the CLI runs this node's launcher in-process
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 128 + signal.SIGINT
    assert not pid_file.exists()
    stderr = proc.stderr.read()
    assert "received SIGINT" in stderr, stderr
    assert_no_survivors(pids, expected_files=2)


def test_ssh_runner_stops_the_other_node_when_one_fails(run_cli, launch_env, tmp_path, free_port, assert_no_survivors):
    """Through the real multi-node path (runner commands started and supervised by the CLI), with a
    stand-in ``ssh`` that runs the remote command on this machine."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_ssh = bindir / "ssh"
    fake_ssh.write_text('#!/bin/bash\n# test stand-in for ssh: run the remote command here\nexec bash -c "${@: -1}"\n')
    fake_ssh.chmod(0o755)
    env = {**launch_env, "PATH": f"{bindir}:{launch_env['PATH']}"}
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = run_cli(
        "-H", "hostfile", "--launcher", "ssh", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(SCRIPTS / "hold.py"), "--pid_dir", str(pids), "--fail_rank", "1", env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "rank 1 (local rank 0 on node 1 'node-b'" in proc.stderr
    assert "RuntimeError: boom from rank 1" in proc.stderr
    assert "stopping the other nodes" in proc.stderr
    assert_no_survivors(pids, expected_files=2)
