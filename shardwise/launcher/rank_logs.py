"""Where each rank's stdout/stderr goes, and the tail of its stderr for the failure summary.

torch's elastic agent either lets a worker write straight to the console or redirects it to a file
(its own "tee" re-prints files line by line with a ``[role0]:`` prefix, which breaks ``\\r`` progress
bars, and the file grows for the whole job, often in a RAM-backed /tmp). We keep stdout on the
console untouched and hand torch a named pipe (FIFO) per rank for stderr: a small pump thread copies
it to our stderr byte for byte as soon as it is written (output looks like DeepSpeed's) and keeps the
last few KB of each rank's stderr to quote if it fails. With ``--enable_each_rank_log DIR`` both
streams go through pipes into ``DIR/<timestamp>_rank<N>.log``, as DeepSpeed names them.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from typing import BinaryIO

from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs

__all__ = ["RankLogs"]

_WAKE_SECONDS = 0.1  # only bounds how quickly stop() is noticed; data is copied as soon as it arrives
_TAIL_BYTES = 8192
_CHUNK = 1 << 16


class _Source:
    """The read end of one worker's output pipe."""

    def __init__(self, path: str, dest: BinaryIO, keep_tail: bool) -> None:
        os.mkfifo(path, 0o600)
        # Opened before the agent opens the write end, so its blocking open() returns at once.
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.dest = dest
        self.keep_tail = keep_tail
        self.tail = bytearray()
        self.last_data = float("inf")
        self.closed = False

    def drain(self) -> None:
        """Copy everything available now; mark the source closed once every writer has gone."""
        wrote = False
        while not self.closed:
            try:
                chunk = os.read(self.fd, _CHUNK)
            except BlockingIOError:
                break
            if not chunk:  # all write ends closed: the worker exited and the agent closed its copy
                self.closed = True
                break
            self._write(chunk)
            wrote = True
            if self.keep_tail:
                self.tail = (self.tail + chunk)[-_TAIL_BYTES:]
                self.last_data = time.monotonic()
        if wrote:
            self._write(b"", flush=True)

    def _write(self, data: bytes, flush: bool = False) -> None:
        # Keep draining even if our own stderr or the log file breaks: a full pipe would block the rank.
        try:
            if data:
                self.dest.write(data)
            if flush:
                self.dest.flush()
        except (OSError, ValueError):
            self.dest = _NullSink()

    def close(self) -> None:
        self.closed = True
        os.close(self.fd)


class RankLogs(LogsSpecs):
    """A torch ``LogsSpecs`` that routes worker output as described in the module docstring.

    ``work_dir`` holds the pipes and error files (the caller deletes it); ``rank_log_dir`` switches to
    per-rank log files named ``<prefix>_rank<N>.log``. Call :meth:`stop` after the agent returns.
    """

    def __init__(self, work_dir: str, rank_log_dir: str | None = None, prefix: str = "") -> None:
        super().__init__(log_dir=work_dir)
        self._work_dir = work_dir
        self._rank_log_dir = rank_log_dir
        self._prefix = prefix
        self._sources: dict[int, list[_Source]] = {}
        self._log_handles: list[BinaryIO] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def root_log_dir(self) -> str:
        return self._work_dir

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        """Called by the agent just before it starts the workers: make their pipes, start the pump."""
        stdouts: dict[int, str] = {}
        stderrs: dict[int, str] = {}
        error_files: dict[int, str] = {}
        console_err = _binary(sys.stderr)
        for local_rank, env in envs.items():
            rank = int(env.get("RANK", local_rank))
            base = os.path.join(self._work_dir, f"rank{rank}")
            error_files[local_rank] = env["TORCHELASTIC_ERROR_FILE"] = base + ".error.json"
            stderrs[local_rank] = base + ".stderr"
            if self._rank_log_dir:
                log_path = os.path.join(self._rank_log_dir, f"{self._prefix}_rank{rank}.log")
                handle = open(log_path, "ab")  # noqa: SIM115 - closed by stop()
                self._log_handles.append(handle)
                stdouts[local_rank] = base + ".stdout"
                self._sources[rank] = [
                    _Source(stdouts[local_rank], handle, keep_tail=False),
                    _Source(stderrs[local_rank], handle, keep_tail=True),
                ]
            else:
                stdouts[local_rank] = ""  # "" = inherit the console
                self._sources[rank] = [_Source(stderrs[local_rank], console_err, keep_tail=True)]
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shardwise-rank-logs", daemon=True)
            self._thread.start()
        return LogsDest(stdouts, stderrs, {}, {}, error_files)

    def _open_sources(self) -> dict[int, _Source]:
        return {s.fd: s for sources in list(self._sources.values()) for s in sources if not s.closed}

    def _run(self) -> None:
        while not self._stop.is_set():
            sources = self._open_sources()
            if not sources:
                self._stop.wait(_WAKE_SECONDS)
                continue
            readable, _, _ = select.select(list(sources), [], [], _WAKE_SECONDS)
            for fd in readable:
                sources[fd].drain()

    def stop(self) -> None:
        """Stop the pump after copying whatever the workers wrote last; close pipes and log files."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for sources in self._sources.values():
            for source in sources:
                if not source.closed:
                    source.drain()
                    source.close()
        for handle in self._log_handles:
            handle.close()
        self._log_handles.clear()

    def stderr_tail(self, rank: int, max_lines: int = 20) -> list[str]:
        """The last ``max_lines`` non-blank lines rank ``rank`` wrote to stderr."""
        tail = b"".join(s.tail for s in self._sources.get(rank, []) if s.keep_tail)
        lines = [line.rstrip() for line in tail.decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-max_lines:]

    def last_write(self, rank: int) -> float:
        """When rank ``rank`` last wrote to stderr (``time.monotonic()``); ``inf`` if it never did."""
        return min((s.last_data for s in self._sources.get(rank, []) if s.keep_tail), default=float("inf"))

    def log_file(self, rank: int) -> str | None:
        """The per-rank log file of ``rank`` when ``--enable_each_rank_log`` is on."""
        if not self._rank_log_dir:
            return None
        return os.path.join(self._rank_log_dir, f"{self._prefix}_rank{rank}.log")


class _NullSink:
    """Where output goes once its real destination failed."""

    def write(self, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass


class _TextAsBinary:
    """Adapter for a text stream without ``.buffer`` (e.g. a test's capture object)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, data: bytes) -> None:
        self._stream.write(data.decode("utf-8", "replace"))

    def flush(self) -> None:
        self._stream.flush()


def _binary(stream) -> BinaryIO:
    buffer = getattr(stream, "buffer", None)
    return buffer if buffer is not None else _TextAsBinary(stream)  # type: ignore[return-value]
