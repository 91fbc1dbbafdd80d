"""Where each rank's stdout/stderr goes, and the tail of its stderr for the failure summary.

torch's elastic agent either lets a worker write straight to the console or redirects it to a file
(its own "tee" re-prints files line by line with a ``[role0]:`` prefix, which breaks ``\\r`` progress
bars). We keep stdout on the console untouched, send stderr through a file that a small pump thread
copies to our stderr byte for byte (so output looks like DeepSpeed's, and we keep the last few KB of
each rank's stderr to quote when it fails), or, with ``--enable_each_rank_log DIR``, append both
streams to ``DIR/<timestamp>_rank<N>.log`` as DeepSpeed does.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import BinaryIO

from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs

__all__ = ["RankLogs"]

_POLL_SECONDS = 0.05
_TAIL_BYTES = 8192
_CHUNK = 1 << 20


class _Source:
    """One worker output file being followed."""

    def __init__(self, path: str, dest: BinaryIO, keep_tail: bool) -> None:
        self.path = path
        self.dest = dest
        self.keep_tail = keep_tail
        self.offset = 0
        self.tail = bytearray()

    def drain(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size < self.offset:
                    self.offset = 0  # truncated by a restart: start over
                handle.seek(self.offset)
                while chunk := handle.read(_CHUNK):
                    self.offset += len(chunk)
                    self.dest.write(chunk)
                    if self.keep_tail:
                        self.tail = (self.tail + chunk)[-_TAIL_BYTES:]
                self.dest.flush()
        except FileNotFoundError:
            return


class RankLogs(LogsSpecs):
    """A torch ``LogsSpecs`` that routes worker output as described in the module docstring.

    ``work_dir`` holds the intermediate files (the caller deletes it); ``rank_log_dir`` switches to
    per-rank log files named ``<prefix>_rank<N>.log``. Call :meth:`stop` after the agent returns.
    """

    def __init__(self, work_dir: str, rank_log_dir: str | None = None, prefix: str = "") -> None:
        super().__init__(log_dir=work_dir)
        self._work_dir = work_dir
        self._rank_log_dir = rank_log_dir
        self._prefix = prefix
        self._sources: dict[int, list[_Source]] = {}
        self._error_files: dict[int, str] = {}
        self._log_handles: list[BinaryIO] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def root_log_dir(self) -> str:
        return self._work_dir

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        """Called by the agent just before it starts the workers: name their files, start the pump."""
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
                handle = open(os.path.join(self._rank_log_dir, f"{self._prefix}_rank{rank}.log"), "ab")  # noqa: SIM115
                self._log_handles.append(handle)
                stdouts[local_rank] = base + ".stdout"
                self._sources[rank] = [
                    _Source(base + ".stdout", handle, False),
                    _Source(base + ".stderr", handle, True),
                ]
            else:
                stdouts[local_rank] = ""  # "" = inherit the console
                self._sources[rank] = [_Source(base + ".stderr", console_err, True)]
            self._error_files[rank] = error_files[local_rank]
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shardwise-rank-logs", daemon=True)
            self._thread.start()
        return LogsDest(stdouts, stderrs, {}, {}, error_files)

    def _run(self) -> None:
        while not self._stop.wait(_POLL_SECONDS):
            self._drain_all()

    def _drain_all(self) -> None:
        for sources in list(self._sources.values()):
            for source in sources:
                source.drain()

    def stop(self) -> None:
        """Stop the pump after copying whatever the workers wrote last; close the per-rank logs."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._drain_all()
        for handle in self._log_handles:
            handle.close()
        self._log_handles.clear()

    def stderr_tail(self, rank: int, max_lines: int = 20) -> list[str]:
        """The last ``max_lines`` non-blank lines rank ``rank`` wrote to stderr."""
        tail = b"".join(s.tail for s in self._sources.get(rank, []) if s.keep_tail)
        lines = [line.rstrip() for line in tail.decode("utf-8", "replace").splitlines() if line.strip()]
        return lines[-max_lines:]

    def last_write(self, rank: int) -> float:
        """When rank ``rank`` last wrote to stderr (file mtime, seconds); ``inf`` if unknown."""
        times = [
            os.stat(s.path).st_mtime for s in self._sources.get(rank, []) if s.keep_tail and os.path.exists(s.path)
        ]
        return max(times, default=float("inf"))

    def log_file(self, rank: int) -> str | None:
        """The per-rank log file of ``rank`` when ``--enable_each_rank_log`` is on."""
        if not self._rank_log_dir:
            return None
        return os.path.join(self._rank_log_dir, f"{self._prefix}_rank{rank}.log")


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
