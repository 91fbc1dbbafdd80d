"""Data efficiency (DeepSpeed's ``runtime/data_pipeline``): curriculum learning and random-LTD token dropping.

* ``curriculum.py`` — ``CurriculumScheduler``: difficulty by step (fixed_linear, fixed_root, fixed_discrete, custom);
* ``sampler.py`` — ``DataSampler``: the curriculum batch sampler (clusters of admitted samples, per-rank slices);
* ``indexed.py`` — the metric index files the sampler reads (DeepSpeed's mmap format) and ``write_metric_index``;
* ``loader.py`` — ``CurriculumDataLoader`` and ``truncate_batch`` (the ``seqlen_truncate`` metric);
* ``random_ltd.py`` — ``RandomLTDScheduler``, ``RandomLayerTokenDrop``, ``convert_to_random_ltd``;
* ``engine_api.py`` — the engine's methods (``set_data_post_process_func``, ``random_ltd_initialize``, ...).

See docs/data_efficiency.md.
"""

from shardwise.data.curriculum import CurriculumScheduler
from shardwise.data.indexed import IndexedRows, write_metric_index
from shardwise.data.loader import CurriculumDataLoader, truncate_batch
from shardwise.data.random_ltd import (
    RandomLayerTokenDrop,
    RandomLTDScheduler,
    convert_to_random_ltd,
    remove_random_ltd_state_dict,
    save_without_random_ltd,
)
from shardwise.data.sampler import DataSampler

__all__ = ["CurriculumDataLoader", "CurriculumScheduler", "DataSampler", "IndexedRows", "RandomLTDScheduler",
           "RandomLayerTokenDrop", "convert_to_random_ltd", "remove_random_ltd_state_dict", "save_without_random_ltd",
           "truncate_batch", "write_metric_index"]
