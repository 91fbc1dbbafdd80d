"""Helpers for the launcher tests: free ports, an isolated environment, CLI runs, survivor checks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

SCRIPTS = Path(__file__).parent / "scripts"
CLI = [sys.executable, "-m", "shardwise.launcher.cli"]


@pytest.fixture
def free_port():
    """A function returning a TCP port that is free on 127.0.0.1 right now."""

    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    return pick


@pytest.fixture
def launch_env(tmp_path):
    """Environment for launcher subprocesses: own HOME (no stray ~/.deepspeed_env), no GPU selection,
    one OpenMP thread per rank (2 cores here)."""
    env = dict(os.environ)
    for name in ("CUDA_VISIBLE_DEVICES", "DS_ENV_FILE", "SHARDWISE_ENV_FILE", "GLOO_SOCKET_IFNAME"):
        env.pop(name, None)
    home = tmp_path / "home"
    home.mkdir()
    env.update(HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def run_cli(launch_env, tmp_path):
    """Run the ``shardwise`` CLI to completion; returns the CompletedProcess (text, both streams)."""

    def run(*args: str, cwd=None, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CLI, *args],
            cwd=cwd or tmp_path,
            env=env or launch_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def rank_info(output: str) -> list[dict[str, str]]:
    """Parse the ``RANKINFO {json}`` lines printed by scripts/rank_env.py, sorted by rank."""
    rows = []
    for line in output.splitlines():
        if line.startswith("RANKINFO "):
            rows.append(json.loads(line[len("RANKINFO ") :]))
    return sorted(rows, key=lambda row: int(row["rank"]))


@pytest.fixture
def parse_rank_info():
    return rank_info


@pytest.fixture
def assert_no_survivors():
    """Check that every pid recorded by scripts/hold.py (ranks and their children) is gone."""

    def check(pid_dir: Path, expected_files: int) -> list[int]:
        files = sorted(pid_dir.glob("rank*.pids"))
        assert len(files) == expected_files, [f.name for f in files]
        pids = [int(p) for f in files for p in f.read_text().split()]
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        for pid in alive:  # don't leak them into the rest of the session, then fail
            psutil.Process(pid).kill()
        assert not alive, f"processes of the run survived: {alive}"
        return pids

    return check
