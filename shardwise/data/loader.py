"""``CurriculumDataLoader``: the training loader ``initialize(training_data=...)`` returns when curriculum learning
is on (DeepSpeed's ``DeepSpeedDataLoader`` in curriculum mode), and the seqlen truncation it applies.

Each batch comes from the ``DataSampler`` (``sampler.py``) and is then post-processed with the difficulties of the
global batch it belongs to: by ``post_process_func(batch, sampler_state)`` when the script set one
(``engine.set_data_post_process_func``; Megatron-DeepSpeed's ``data_post_process`` reads
``sampler_state["current_difficulties"]``), otherwise, when a metric is named ``seqlen_truncate``, by
``truncate_batch``: every tensor of at least two dimensions is cut to the current difficulty along dimension 1
(the sequence dimension of batch-first token ids, masks and labels).

The difficulties are recorded when the sampler yields each batch and consumed in the same order, so they match the
batch even when the underlying ``DataLoader`` prefetches with worker processes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from shardwise.data.sampler import DataSampler

SEQLEN_TRUNCATE = "seqlen_truncate"


def truncate_batch(batch: Any, seqlen: int) -> Any:
    """``batch`` (a tensor, or dicts/lists/tuples of them) with every tensor of ``ndim >= 2`` longer than
    ``seqlen`` along dimension 1 cut to its first ``seqlen`` positions; everything else unchanged."""
    if torch.is_tensor(batch):
        if batch.dim() >= 2 and batch.size(1) > seqlen:
            return batch[:, :seqlen].contiguous()
        return batch
    if isinstance(batch, dict):
        return {k: truncate_batch(v, seqlen) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(truncate_batch(v, seqlen) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(truncate_batch(v, seqlen) for v in batch)
    return batch


class _TrackedSampler:
    """Yields the sampler's micro-batches and records the difficulties each was drawn at."""

    def __init__(self, sampler: DataSampler, pending: deque) -> None:
        self.sampler = sampler
        self.pending = pending

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.sampler:
            self.pending.append(dict(self.sampler.current_difficulties))
            yield indices

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.sampler.micro_batch_size)


class CurriculumDataLoader:
    """Iterates this rank's curriculum micro-batches, post-processed (see the module docstring)."""

    def __init__(self, dataset: Dataset, sampler: DataSampler, collate_fn: Callable | None = None,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.data_sampler = sampler
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.batch_size = sampler.micro_batch_size
        #: ``fn(batch, sampler_state) -> batch``, set by ``engine.set_data_post_process_func``
        self.post_process_func: Callable[[Any, dict], Any] | None = None
        self._pending: deque = deque()
        self._it: Iterator | None = None

    def __len__(self) -> int:
        n = len(self.data_sampler)
        return n // self.batch_size if self.data_sampler.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> CurriculumDataLoader:
        self._pending.clear()
        loader = DataLoader(self.dataset, batch_sampler=_TrackedSampler(self.data_sampler, self._pending),
                            collate_fn=self.collate_fn, num_workers=self.num_workers, pin_memory=self.pin_memory)
        self._it = iter(loader)
        return self

    def __next__(self) -> Any:
        if self._it is None:
            iter(self)
        data = next(self._it)
        difficulties = self._pending.popleft()
        if self.post_process_func is not None:
            state = self.data_sampler.state_dict()
            state["current_difficulties"] = difficulties
            return self.post_process_func(data, state)
        if SEQLEN_TRUNCATE in difficulties:
            return truncate_batch(data, int(difficulties[SEQLEN_TRUNCATE]))
        return data


__all__ = ["SEQLEN_TRUNCATE", "CurriculumDataLoader", "truncate_batch"]
