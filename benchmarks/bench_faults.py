"""Fault benchmark: how each launcher/collective fault ends, and how long it takes, on 2-3 CPU ranks (gloo).

Run:  python benchmarks/bench_faults.py                  (every scenario, --repeat 3; ~3 min on 2 quiet cores)
      python benchmarks/bench_faults.py --teardown-runs 20 --against /path/to/other/checkout

Scenarios (the scripts are the fault tests' own, in tests/launcher/scripts/):

* rank SIGKILL: rank 1 of 2 is killed with SIGKILL from outside (as the OOM killer does) once both ranks are up;
  time from the kill to the launcher's exit, its exit code, and whether the report names rank 1 and SIGKILL;
* rank raises: rank 1 raises right after printing READY; time from READY to the launcher's exit;
* launcher SIGKILL: ``kill -9`` of the launcher; time until every rank, rank child and rank keeper is gone;
* launcher SIGTERM: time until the launcher has exited, and whether any process of the job survived;
* collective timeout: rank 2 of 3 never reaches an all-reduce, SHARDWISE_COMM_TIMEOUT=T; time from READY to the
  launcher's exit (T + the arrival check's grace + the shutdown), and whether the error names rank 2;
* teardown: a script ending right after a collective, launched ``--teardown-runs`` times; exit codes counted.

``--against DIR`` runs the launcher and ranks with ``PYTHONPATH=DIR`` (another checkout, e.g. before a fix).
Times are wall-clock on a shared machine: the median of ``--repeat`` runs is reported with the range.
Results: ``benchmarks/results/faults.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "launcher" / "scripts"
RESULTS = ROOT / "benchmarks" / "results" / "faults.md"
POLL_S = 0.02


def _env(against: str | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SHARDWISE_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = against or str(ROOT)
    return env


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Job:
    """One launch of the CLI, its stdout lines watched for ``READY <rank>``."""

    def __init__(self, ranks: int, script: str, args: list[str], env: dict[str, str], tmp: Path) -> None:
        cmd = [sys.executable, "-m", "shardwise.launcher.cli", "--num_gpus", str(ranks), "--master_port",
               str(_port()), str(SCRIPTS / script), *args]
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.ready: dict[str, float] = {}
        self.stderr = ""
        threading.Thread(target=self._read_out, daemon=True).start()
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._err.start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("READY"):
                self.ready[line.split()[1]] = time.monotonic()

    def _read_err(self) -> None:
        self.stderr = self.proc.stderr.read()

    def wait_ready(self, ranks: int, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while len(self.ready) < ranks:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the job did not start: {self.stderr[-2000:]}")
            time.sleep(POLL_S)
        return max(self.ready.values())

    def wait_exit(self, timeout: float = 300) -> tuple[int, float]:
        code = self.proc.wait(timeout=timeout)
        end = time.monotonic()
        self._err.join(timeout=10)
        return code, end


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _pids(pid_dir: Path, exclude: int) -> list[int]:
    return [p for f in sorted(pid_dir.glob("rank*.pids")) for p in map(int, f.read_text().split()) if p != exclude]


def rank_sigkill(env: dict[str, str], tmp: Path) -> dict:
    pid_dir = tmp / "pids"
    pid_dir.mkdir()
    job = Job(2, "hold.py", ["--pid_dir", str(pid_dir)], env, tmp)
    job.wait_ready(2)
    rank1 = int((pid_dir / "rank1.pids").read_text().split()[0])
    start = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    code, end = job.wait_exit()
    named = "rank 1 (local rank 1" in job.stderr and "failed with signal SIGKILL" in job.stderr
    return {"seconds": end - start, "code": code, "ok": named and code == 137,
            "survivors": len(_alive(_pids(pid_dir, job.proc.pid)))}


def rank_raises(env: dict[str, str], tmp: Path) -> dict:
    pid_dir = tmp / "pids"
    pid_dir.mkdir()
    job = Job(2, "hold.py", ["--pid_dir", str(pid_dir), "--fail_rank", "1"], env, tmp)
    job.wait_ready(2)
    code, end = job.wait_exit()
    named = "rank 1 (local rank 1" in job.stderr and "boom from rank 1" in job.stderr
    return {"seconds": end - job.ready["1"], "code": code, "ok": named and code == 1,
            "survivors": len(_alive(_pids(pid_dir, job.proc.pid)))}


def launcher_signal(sig: int, env: dict[str, str], tmp: Path) -> dict:
    pid_dir = tmp / "pids"
    pid_dir.mkdir()
    job = Job(2, "hold.py", ["--pid_dir", str(pid_dir)], env, tmp)
    job.wait_ready(2)
    pids = _pids(pid_dir, job.proc.pid)
    start = time.monotonic()
    job.proc.send_signal(sig)
    code, _ = job.wait_exit()
    deadline = start + 120
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    survivors = _alive(pids)
    for pid in survivors:
        psutil.Process(pid).kill()
    return {"seconds": time.monotonic() - start if not survivors else float("inf"), "code": code,
            "ok": not survivors, "survivors": len(survivors)}


def collective_timeout(seconds: int, env: dict[str, str], tmp: Path) -> dict:
    job = Job(3, "late.py", ["--late_rank", "2"], {**env, "SHARDWISE_COMM_TIMEOUT": str(seconds)}, tmp)
    ready = job.wait_ready(3)
    code, end = job.wait_exit()
    return {"seconds": end - ready, "code": code, "ok": "Rank 2 did not arrive" in job.stderr, "survivors": 0}


def teardown(runs: int, env: dict[str, str], tmp: Path) -> dict:
    codes = []
    for _ in range(runs):
        cmd = [sys.executable, "-m", "shardwise.launcher.cli", "-q", "--num_gpus", "2", "--master_port",
               str(_port()), str(SCRIPTS / "last_collective.py")]
        codes.append(subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, timeout=300).returncode)
    return {"codes": codes}


def _summary(rows: list[dict]) -> str:
    times = [r["seconds"] for r in rows]
    finite = [t for t in times if t != float("inf")]
    spread = f" ({min(finite):.1f}-{max(finite):.1f})" if len(finite) > 1 else ""
    median = f"{statistics.median(finite):.1f}{spread}" if finite else "never"
    codes = sorted({r["code"] for r in rows})
    ok = sum(r["ok"] for r in rows)
    return f"{median} | {', '.join(map(str, codes))} | {ok}/{len(rows)} | {sum(r['survivors'] for r in rows)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--teardown-runs", type=int, default=10)
    p.add_argument("--against", default=None, help="PYTHONPATH of another checkout to measure instead")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    env = _env(args.against)
    scenarios = [
        ("a rank killed by SIGKILL (OOM killer)", "kill -> launcher exit", rank_sigkill),
        ("a rank raises", "READY -> launcher exit", rank_raises),
        ("launcher killed by SIGKILL", "kill -> every job process gone", lambda e, t: launcher_signal(9, e, t)),
        ("launcher gets SIGTERM", "signal -> every job process gone", lambda e, t: launcher_signal(15, e, t)),
        ("collective timeout, 3 ranks, T = 3 s", "READY -> launcher exit", lambda e, t: collective_timeout(3, e, t)),
        ("collective timeout, 3 ranks, T = 10 s", "READY -> launcher exit", lambda e, t: collective_timeout(10, e, t)),
    ]
    lines = [
        "# Fault benchmark",
        "",
        f"`python benchmarks/bench_faults.py --repeat {args.repeat} --teardown-runs {args.teardown_runs}"
        + (f" --against {args.against}" if args.against else "") + f"` on {platform.node()} "
        f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start), {time.strftime('%Y-%m-%d')}.",
        "",
        "| fault | time measured | seconds: median (range) | launcher exit codes | named / cleaned up correctly "
        "| processes left |",
        "|---|---|---|---|---|---|",
    ]
    for name, what, run in scenarios:
        rows = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(run(env, Path(tmp)))
        lines.append(f"| {name} | {what} | {_summary(rows)} |")
        print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        codes = teardown(args.teardown_runs, env, Path(tmp))["codes"]
    bad = [c for c in codes if c != 0]
    lines += ["", f"Teardown: a 2-rank script ending right after a collective, {len(codes)} launches: "
              f"{len(codes) - len(bad)} exited 0, {len(bad)} did not (exit codes {sorted(set(bad)) or 'none'})."]
    print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
