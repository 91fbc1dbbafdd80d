"""``DataSampler``: curriculum data sampling (``deepspeed.runtime.data_pipeline.data_sampling.data_sampler.
DeepSpeedDataSampler``), a batch sampler yielding each data-parallel rank's sample ids, micro-batch by micro-batch.

Per global batch (``micro x dp x gradient_accumulation`` samples) the curriculum step advances by one and every
metric's scheduler gives its difficulty. When a difficulty changes, a new *cluster* of newly admitted samples is
formed (metrics with ``clustering_type: "schedule_based"`` admit samples whose metric value, or percentile, is at
most the difficulty; ``"single_cluster"`` metrics admit everything and only drive post-processing such as
``seqlen_truncate``). The global batch is drawn from the clusters in proportion to their sizes, each cluster read
in a shuffled order and reshuffled when exhausted; then it is cut into micro-batches, and each micro-batch into
contiguous per-rank slices. This is DeepSpeed's algorithm.

Where shardwise differs: every rank computes the same global batch from the same seeded generator (DeepSpeed
computes it on rank 0 and broadcasts), so sampling needs no collective; clusters live in memory instead of files
under ``data_cluster_path`` (and are saved in checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from shardwise.data.curriculum import CurriculumScheduler
from shardwise.data.indexed import IndexedRows

_DIFFICULTY_TYPES = ("value", "percentile")
_CLUSTERING_TYPES = ("schedule_based", "single_cluster")
_PATH = "data_efficiency.data_sampling.curriculum_learning.curriculum_metrics"


class _Metric:
    """One curriculum metric: its scheduler, how it admits samples, and its index files (if it clusters)."""

    def __init__(self, name: str, cfg: Any) -> None:
        self.name = name
        self.scheduler = CurriculumScheduler(cfg)
        self.difficulty_type = cfg.difficulty_type
        self.clustering_type = cfg.clustering_type
        self.max_difficulty = cfg.max_difficulty
        for key, value, allowed in (("difficulty_type", self.difficulty_type, _DIFFICULTY_TYPES),
                                    ("clustering_type", self.clustering_type, _CLUSTERING_TYPES)):
            if value not in allowed:
                raise ValueError(f"{_PATH}.{name}.{key} = {value!r}: expected one of {', '.join(allowed)}. Fix: "
                                 f"set it (a template placeholder that was not filled in?)")
        self.to_sample: IndexedRows | None = None
        self.to_metric: IndexedRows | None = None
        self._values: np.ndarray | None = None
        if self.clusters:
            self.to_sample = IndexedRows(self._path(cfg.index_to_sample_path, "index_to_sample_path"))
            if self.difficulty_type == "value":
                self.to_metric = IndexedRows(self._path(cfg.index_to_metric_path, "index_to_metric_path"))
                if len(self.to_metric) != len(self.to_sample):
                    raise ValueError(f"{_PATH}.{name}: index_to_metric has {len(self.to_metric)} rows but "
                                     f"index_to_sample {len(self.to_sample)}; they must come from the same analysis")

    def _path(self, value: str | None, key: str) -> str:
        if not value:
            raise ValueError(f"{_PATH}.{self.name}.{key} is missing; clustering_type \"schedule_based\" reads the "
                             "metric's index files. Fix: set it (shardwise.data.write_metric_index writes them)")
        return value

    @property
    def clusters(self) -> bool:
        """Whether the metric restricts which samples are admitted."""
        return self.clustering_type != "single_cluster"

    def admitted(self, low: Any, high: Any) -> np.ndarray:
        """Sample ids with metric value in (low, high], or in percentiles [low, high)."""
        assert self.to_sample is not None
        if self.difficulty_type == "value":
            if self._values is None:  # one metric value per row, read once
                assert self.to_metric is not None
                self._values = np.array([self.to_metric[r][0] for r in range(len(self.to_metric))])
            rows = [self.to_sample[int(r)] for r in np.flatnonzero((self._values > low) & (self._values <= high))]
            return np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        everything = np.concatenate([self.to_sample[r] for r in range(len(self.to_sample))]).astype(np.int64) \
            if len(self.to_sample) else np.zeros(0, np.int64)
        per_percentile = len(everything) // self.max_difficulty
        start = per_percentile * low
        end = len(everything) if high == self.max_difficulty else per_percentile * high
        return everything[int(start):int(end)]


class DataSampler:
    """A batch sampler (``DataLoader(dataset, batch_sampler=sampler)``) of this rank's curriculum micro-batches."""

    def __init__(self, data_efficiency: Any, one_epoch_total_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, gradient_accumulation_steps: int,
                 drop_last: bool = True) -> None:
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if one_epoch_total_samples < 1:
            raise ValueError("the training dataset is empty: curriculum sampling needs at least one sample")
        sampling = data_efficiency.data_sampling
        self.one_epoch_total_samples = one_epoch_total_samples
        self.total_samples = one_epoch_total_samples * sampling.num_epochs
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.global_batch_size = self.micro_batch_times_data_parallel_size * gradient_accumulation_steps
        self.drop_last = drop_last
        self.np_rng = np.random.default_rng(data_efficiency.seed)
        self.metrics = {name: _Metric(name, cfg)
                        for name, cfg in sampling.curriculum_learning.curriculum_metrics.items()}
        self.batch: list[int] = []
        self.consumed_samples = 0
        self.curriculum_step = 0
        self.current_difficulties: dict[str, Any] = {}
        self.clusters: list[np.ndarray] = []
        self.cluster_positions: list[int] = []

    def __len__(self) -> int:
        return self.total_samples

    def set_custom_curriculum_learning_schedule(self, schedule_func_dict: dict[str, Any]) -> None:
        """``{metric name: step -> difficulty}`` for metrics with ``schedule_type: "custom"``."""
        for name, fn in schedule_func_dict.items():
            if name in self.metrics:
                self.metrics[name].scheduler.set_custom_get_difficulty(fn)

    # -- clusters ---------------------------------------------------------------------------------------------------
    def _new_cluster(self, previous: dict[str, Any]) -> None:
        clustering = [m for m in self.metrics.values() if m.clusters]
        cluster: np.ndarray | None = None
        if len(clustering) > 1:  # intersect every metric's admitted set, minus what earlier clusters hold
            for m in self.metrics.values():
                admitted = m.admitted(-np.inf if m.difficulty_type == "value" else 0,
                                      self.current_difficulties[m.name]) if m.clusters \
                    else np.arange(self.one_epoch_total_samples, dtype=np.int64)
                cluster = admitted if cluster is None else np.intersect1d(cluster, admitted, assume_unique=True)
            for old in self.clusters:
                cluster = np.setdiff1d(cluster, old, assume_unique=True)
        else:
            if not self.clusters:
                cluster = np.arange(self.one_epoch_total_samples, dtype=np.int64)
            for m in clustering:
                cluster = m.admitted(previous[m.name], self.current_difficulties[m.name])
        if cluster is not None and len(cluster):
            cluster = np.array(cluster, dtype=np.int64)
            self.np_rng.shuffle(cluster)
            self.clusters.append(cluster)
            self.cluster_positions.append(0)

    def _take(self, cidx: int, count: int) -> list[int]:
        cluster, start = self.clusters[cidx], self.cluster_positions[cidx]
        taken = cluster[start:start + count].tolist()
        self.cluster_positions[cidx] = start + count
        if len(taken) < count:  # exhausted: reshuffle and continue from the start
            remaining = count - len(taken)
            reshuffled = cluster.copy()
            self.np_rng.shuffle(reshuffled)
            self.clusters[cidx] = reshuffled
            taken += reshuffled[:remaining].tolist()
            self.cluster_positions[cidx] = remaining
        return taken

    def _next_global_batch(self) -> None:
        self.curriculum_step += 1
        changed, previous = False, {}
        for name, m in self.metrics.items():
            difficulty = m.scheduler.update_difficulty(self.curriculum_step)
            if name not in self.current_difficulties or difficulty != self.current_difficulties[name]:
                changed = True
            previous[name] = self.current_difficulties.get(
                name, -np.inf if m.difficulty_type == "value" else 0)
            self.current_difficulties[name] = difficulty
        if changed:
            self._new_cluster(previous)
        if not self.clusters:
            raise RuntimeError(f"curriculum step {self.curriculum_step}: no training sample is admitted at "
                               f"difficulties {self.current_difficulties}; lower min_difficulty to include some (a "
                               "percentile metric puts len(data) // max_difficulty samples in each percentile)")
        sizes = np.array([len(c) for c in self.clusters], dtype=np.float64)
        picks = self.np_rng.choice(len(self.clusters), self.global_batch_size, replace=True, p=sizes / sizes.sum())
        counts = np.bincount(picks, minlength=len(self.clusters))
        batch: list[int] = []
        for cidx, count in enumerate(counts):
            batch += self._take(cidx, int(count))
        self.np_rng.shuffle(batch)
        self.batch = batch

    # -- iteration ---------------------------------------------------------------------------------------------------
    def get_start_end_idx(self, batch_len: int | None = None) -> tuple[int, int]:
        """This rank's slice of a micro-batch of ``batch_len`` samples (all ranks together)."""
        n = batch_len or self.micro_batch_times_data_parallel_size
        start = round(self.data_parallel_rank * n / self.data_parallel_size)
        end = round((self.data_parallel_rank + 1) * n / self.data_parallel_size)
        return start, end

    def __iter__(self) -> Iterator[list[int]]:
        while self.consumed_samples <= self.total_samples:
            if not self.batch:
                self._next_global_batch()
            current = self.batch[:self.micro_batch_times_data_parallel_size]
            self.batch = self.batch[self.micro_batch_times_data_parallel_size:]
            if len(current) == self.micro_batch_times_data_parallel_size or (current and not self.drop_last):
                start, end = self.get_start_end_idx(len(current))
                self.consumed_samples += len(current)
                yield current[start:end]

    # -- checkpoints ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same sample sequence (DeepSpeed's keys where they exist)."""
        return {
            "batch": list(self.batch), "consumed_samples": self.consumed_samples,
            "curriculum_step": self.curriculum_step, "current_difficulties": dict(self.current_difficulties),
            "curriculum_states": {n: dict(m.scheduler.get_state()) for n, m in self.metrics.items()},
            "clusters": [torch.from_numpy(c) for c in self.clusters],
            "data_cluster_current_position": list(self.cluster_positions),
            "np_rng_state": self.np_rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict``."""
        self.batch = [int(i) for i in state["batch"]]
        self.consumed_samples = int(state["consumed_samples"])
        self.curriculum_step = int(state["curriculum_step"])
        self.current_difficulties = dict(state["current_difficulties"])
        for name, sched_state in state.get("curriculum_states", {}).items():
            if name in self.metrics:
                self.metrics[name].scheduler.set_state(dict(sched_state))
        self.clusters = [np.asarray(torch.as_tensor(c).numpy(), dtype=np.int64).copy() for c in state["clusters"]]
        self.cluster_positions = [int(p) for p in state["data_cluster_current_position"]]
        self.np_rng.bit_generator.state = state["np_rng_state"]


__all__ = ["DataSampler"]
