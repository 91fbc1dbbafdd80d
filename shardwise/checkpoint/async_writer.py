"""Asynchronous saves: one background writer thread per engine, and the waits that order saves.

[Note: asynchronous save]
``save_checkpoint`` with ``checkpoint.async_save: true`` snapshots this rank's state into host memory (copies, so
training may change the live tensors), starts a thread that writes the rank's files, and returns. Rank 0's thread
then waits for every rank's completion marker (files, not collectives: a collective from a side thread would race
the training step's collectives) and commits the manifest and ``latest`` as soon as all are durable, without any
further call from the training loop. The next ``save_checkpoint`` or ``load_checkpoint`` waits for the previous
save first (and raises its error, if it failed); so does :func:`wait`. The thread is not a daemon, so a normal
interpreter exit waits for it; ``engine.destroy()`` should call :func:`wait` (``os._exit`` skips both).
Memory: one extra host copy of this rank's checkpointed state while a save is in flight.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from shardwise.checkpoint.commit import SaveJob
from shardwise.checkpoint.errors import CheckpointError
from shardwise.common.logging import logger

if TYPE_CHECKING:
    from shardwise.engine.engine import Engine


class _Pending:
    def __init__(self, job: SaveJob) -> None:
        self.job = job
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"shardwise-save-{job.tag}", daemon=False)

    def _run(self) -> None:
        try:
            self.job.write_rank_files()
            if self.job.rank == 0:
                self.job.commit(poll=True)
                logger.info("[rank 0] checkpoint %s committed (asynchronous save)", self.job.tag_dir)
        except BaseException as exc:  # reported by wait(); also logged now, training may run for a while
            self.error = exc
            self.job.mark_failed(exc)
            logger.error("[rank %d] asynchronous save of %s failed: %s", self.job.rank, self.job.tag_dir, exc)


_PENDING: weakref.WeakKeyDictionary[Any, _Pending] = weakref.WeakKeyDictionary()


def start(engine: Engine, job: SaveJob) -> None:
    """Run ``job`` in the background for ``engine`` (the caller has waited for the previous one)."""
    if engine in _PENDING:
        raise CheckpointError("internal error: a save is already in flight for this engine")
    pending = _Pending(job)
    _PENDING[engine] = pending
    pending.thread.start()


def in_flight(engine: Engine) -> bool:
    """Whether a background save of ``engine`` has not finished yet."""
    pending = _PENDING.get(engine)
    return pending is not None and pending.thread.is_alive()


def wait(engine: Engine) -> None:
    """Block until ``engine``'s background save (if any) is written (and, on rank 0, committed); raise its error."""
    pending = _PENDING.pop(engine, None)
    if pending is None:
        return
    pending.thread.join()
    if pending.error is not None:
        raise CheckpointError(f"the asynchronous save of {pending.job.tag_dir} failed on rank {pending.job.rank}: "
                              f"{pending.error}") from pending.error
