"""The data loader ``initialize(training_data=...)`` returns: each data-parallel rank reads its own shard.

Ranks that share a data-parallel coordinate (tensor-, sequence- and pipeline-parallel peers) read the same
samples, since they cooperate on the same micro-batch. With curriculum learning on
(``data_efficiency.data_sampling.curriculum_learning``) the loader is ``shardwise.data.CurriculumDataLoader``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from shardwise.accelerator import get_accelerator
from shardwise.utils.repeating_loader import RepeatingLoader  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from shardwise.config import ShardwiseConfig



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


def build_training_loader(dataset: Dataset, config: ShardwiseConfig, dp_size: int, dp_rank: int,
                          collate_fn: Callable | None = None) -> Any:
    """The engine's training loader: the curriculum loader when curriculum learning is on, else ``build_dataloader``."""
    sampling = config.data_efficiency.data_sampling
    if not sampling.curriculum_learning.enabled:
        return build_dataloader(dataset, config.train_micro_batch_size_per_gpu, dp_size, dp_rank,
                                collate_fn=collate_fn, drop_last=config.dataloader_drop_last)
    from shardwise.data import CurriculumDataLoader, DataSampler

    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError("curriculum learning (data_efficiency.data_sampling.curriculum_learning) samples by index: "
                         f"training_data must be a map-style dataset with __len__, got {type(dataset).__name__}")
    sampler = DataSampler(config.data_efficiency, len(dataset), config.train_micro_batch_size_per_gpu, dp_rank,
                          dp_size, config.gradient_accumulation_steps, drop_last=config.dataloader_drop_last)
    pin = sampling.pin_memory and get_accelerator().device_name() != "cpu"
    return CurriculumDataLoader(dataset, sampler, collate_fn=collate_fn, num_workers=sampling.num_workers,
                                pin_memory=pin)
