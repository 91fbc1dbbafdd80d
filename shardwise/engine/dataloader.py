"""The data loader ``initialize(training_data=...)`` returns: each data-parallel rank reads its own shard.

Ranks that share a data-parallel coordinate (tensor-, sequence- and pipeline-parallel peers) read the same
samples, since they cooperate on the same micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from shardwise.accelerator import get_accelerator
from shardwise.utils.repeating_loader import RepeatingLoader  # noqa: F401  (re-exported)


def build_dataloader(dataset: Dataset, micro_batch_size: int, dp_size: int, dp_rank: int,
                     collate_fn: Callable | None = None, drop_last: bool = False, seed: int = 0,
                     num_workers: int = 0) -> DataLoader:
    """A loader of micro-batches of ``micro_batch_size`` over this data-parallel rank's shard."""
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=micro_batch_size, collate_fn=collate_fn, drop_last=drop_last,
                          num_workers=num_workers)
    sampler = DistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, collate_fn=collate_fn,
                      drop_last=drop_last, num_workers=num_workers,
                      pin_memory=get_accelerator().device_name() != "cpu")
