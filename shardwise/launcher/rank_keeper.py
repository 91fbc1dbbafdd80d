"""Each rank's parent process: the rank, and every process it starts, die with the launcher.

Why: torch's elastic agent (which runs inside the launcher) starts every rank in a session of its own and
stops it with ``killpg`` when the job ends, fails, or is interrupted. A launcher killed by SIGKILL (the OOM
killer, ``kill -9``, a scheduler's hard stop) runs none of that, and its ranks would go on training with
nobody watching them. So the agent does not start the rank directly: it starts this small program, which

1. asks Linux (``prctl(PR_SET_PDEATHSIG)``) for a signal when the launcher's thread that started it exits,
   and on that signal SIGKILLs its whole process group: the rank, the processes the rank started, and itself;
2. pins itself to the rank's share of the cores when ``--bind_cores_to_rank`` asks for it (the rank inherits);
3. starts the rank (fork + exec: the rank also gets SIGKILL should this keeper be killed alone), waits for it,
   and ends exactly as the rank ended: the same exit code, or the same signal, so the launcher's failure report
   names the rank's own exit (e.g. SIGKILL from the OOM killer).

SIGINT/SIGTERM/SIGHUP reach the rank from the agent's ``killpg`` (the rank is in this keeper's process group);
the keeper itself ignores them politely (a no-op handler, which exec resets, so the rank keeps their defaults)
and waits for the rank to finish its own shutdown.

It is run as ``python -I -S rank_keeper.py LAUNCHER_PID LOCAL_RANK NPROC CORES command...`` (``CORES`` is ``-``
or a comma list shared out by local rank): standard library only, no shardwise or torch import, so it costs a
few milliseconds and a few MB per rank. On systems without ``prctl`` (not Linux) step 1 is skipped.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

__all__ = ["LAUNCHER_GONE", "main", "set_parent_death_signal"]

_PR_SET_PDEATHSIG = 1
#: The signal the kernel sends this keeper when the launcher goes; a real-time signal nobody else sends.
LAUNCHER_GONE = int(signal.SIGRTMIN) + 1 if hasattr(signal, "SIGRTMIN") else int(signal.SIGUSR2)
_POLITE = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when the thread that created it exits (Linux
    ``PR_SET_PDEATHSIG``). Returns False where that is not available."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _kill_group(*_args: object) -> None:
    """SIGKILL this keeper's process group (it leads it): the rank, whatever it started, and the keeper."""
    os.killpg(os.getpid(), signal.SIGKILL)


def _bind(local_rank: int, nproc: int, cores: str) -> None:
    """Pin this process (and so the rank) to local rank's equal share of ``cores``; match OMP_NUM_THREADS."""
    ids = [int(c) for c in cores.split(",")]
    per = len(ids) // nproc
    os.sched_setaffinity(0, ids[local_rank * per : (local_rank + 1) * per])
    os.environ["OMP_NUM_THREADS"] = str(per)


def _end_like(status: int) -> None:
    """Exit with the rank's wait status: its exit code, or death by the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the rank dumped core if it was going to; not us
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # these two cannot be caught, so are at their default
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is not to terminate
    os._exit(os.waitstatus_to_exitcode(status))


def _exec_rank(keeper: int, command: list[str]) -> None:
    """In the forked child: die with the keeper, then become the rank."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != keeper:  # the keeper went before prctl took effect
        os._exit(128 + int(signal.SIGKILL))
    try:
        os.execvp(command[0], command)
    except OSError as err:
        sys.stderr.write(f"[shardwise.launcher] cannot start {command[0]!r}: {err.strerror}\n")
        os._exit(127)


def main(argv: list[str]) -> None:
    """``LAUNCHER_PID LOCAL_RANK NPROC CORES command...``: keep one rank (see the module docstring)."""
    launcher_pid, local_rank, nproc, cores, command = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4:]
    if os.getpgrp() != os.getpid():  # torch starts us in a session of our own; make sure, as we kill our group
        os.setsid()
    signal.signal(LAUNCHER_GONE, _kill_group)
    set_parent_death_signal(LAUNCHER_GONE)
    if os.getppid() != launcher_pid:  # the launcher went before prctl took effect
        _kill_group()
    for sig in _POLITE:
        signal.signal(sig, lambda *_: None)
    if cores != "-":
        _bind(local_rank, nproc, cores)
    keeper = os.getpid()
    child = os.fork()
    if child == 0:
        _exec_rank(keeper, command)
    _, status = os.waitpid(child, 0)  # retried after each signal handler (PEP 475)
    _end_like(status)


if __name__ == "__main__":
    main(sys.argv[1:])
