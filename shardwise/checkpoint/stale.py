"""Temporaries of abandoned saves: who wrote each one, and removing those whose writer is provably gone.

[Note: stale temporaries]
Every checkpoint file is first written under a temporary name (``safety.atomic_file``). A save killed mid-write (the
OOM killer, a lost node, ``kill -9``) leaves that temporary behind: a partial shard of up to a rank's whole state, in a
tag directory nobody will save to again. The name of every temporary therefore says who writes it::

    .tmp-<host key>p<pid>s<process start time>-<random>-<final name>

where the host key identifies this kernel boot and PID namespace (a hash of the host name, the boot id and the PID
namespace inode). A temporary is *provably abandoned* only when its writer ran under the same host key (same machine,
same boot, same PID namespace, so this process can see it) and that process is gone: its PID does not exist, or
belongs to a process started at another time (PID reuse). :func:`sweep`, run at the start of every save by one rank
per host, removes those. Nothing else is ever removed: a temporary from another machine, another container's PID
namespace or an earlier boot may belong to a save still running elsewhere, so it is left in place and counted in
the log (delete such files by hand once no job writes to the directory). Within the tag being committed, the commit
itself removes every other save's files, because only the committing job writes there (see [Note: commit
protocol]).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
from dataclasses import dataclass

TMP_PREFIX = ".tmp-"
_WRITER = re.compile(r"^\.tmp-(?P<host>[0-9a-f]{12})p(?P<pid>\d+)s(?P<start>\d+)-")


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def host_key() -> str | None:
    """This machine, boot and PID namespace as 12 hex digits; None where the OS does not tell (then no temporary
    is ever provably abandoned)."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    if not boot:
        return None
    return hashlib.sha256(f"{socket.gethostname()}|{boot}|{pidns}".encode()).hexdigest()[:12]


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat); None if it is gone
    or a zombie (killed, not yet reaped: it can write nothing more)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # fields after "pid (comm)": state is field 3, start time field 22
    try:
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (IndexError, ValueError):
        return None


_TAG: tuple[int, str] | None = None  # (pid, tag): recomputed in a forked child


def writer_tag() -> str:
    """The writer part of this process's temporary names (no ``-``); zeros where the OS does not tell."""
    global _TAG
    pid = os.getpid()
    if _TAG is None or _TAG[0] != pid:
        _TAG = (pid, f"{host_key() or '0' * 12}p{pid}s{process_start(pid) or 0}")
    return _TAG[1]


def temporary_name(final_name: str, random_part: str) -> str:
    """The temporary name under which this process writes ``final_name``."""
    return f"{TMP_PREFIX}{writer_tag()}-{random_part}-{final_name}"


def abandoned(name: str, my_host: str | None) -> bool:
    """Whether temporary ``name`` was written by a process of this host key that no longer runs."""
    m = _WRITER.match(name)
    if m is None or my_host is None or m.group("host") != my_host:
        return False
    start = process_start(int(m.group("pid")))
    return start is None or start != int(m.group("start"))


@dataclass
class SweepResult:
    """What a sweep removed, and what it had to leave (temporaries it cannot prove abandoned)."""

    removed: list[str]
    removed_bytes: int
    kept: int
    kept_bytes: int


def _temporaries(save_dir: str) -> list[os.DirEntry]:
    """Temporaries directly in ``save_dir`` and in its tag directories (symbolic links are not followed)."""
    found: list[os.DirEntry] = []
    with contextlib.suppress(OSError), os.scandir(save_dir) as top:
        for entry in top:
            if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
                found.append(entry)
            elif entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                with contextlib.suppress(OSError), os.scandir(entry.path) as tag:
                    found += [e for e in tag if e.name.startswith(TMP_PREFIX) and e.is_file(follow_symlinks=False)]
    return found


def sweep(save_dir: str) -> SweepResult:
    """Remove the provably abandoned temporaries in ``save_dir`` and its tag directories (see the Note)."""
    me = host_key()
    result = SweepResult([], 0, 0, 0)
    for entry in _temporaries(save_dir):
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
        if not abandoned(entry.name, me):
            result.kept += 1
            result.kept_bytes += size
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            result.removed.append(entry.path)
            result.removed_bytes += size
    return result
