"""The batch arithmetic of AutoTP configs written the DeepSpeed way: Hugging Face Trainer and Accelerate fill
``train_batch_size`` = world size x micro x accumulation (DeepSpeed checks it against the world size under AutoTP),
which shardwise restates per data-parallel rank; any other mismatch still fails in ``load_config``."""

from __future__ import annotations

import pytest

from shardwise.api import _autotp_world_batch
from shardwise.comm.topology import Topology
from shardwise.config import load_config
from shardwise.config.errors import ConfigError

AUTOTP = {"tensor_parallel": {"autotp_size": 2}}


def _topology(tp: int, world: int = 4) -> Topology:
    return Topology(tp=tp, world_size=world, rank=0, create_groups=False)


def test_world_counted_batch_is_restated_per_data_parallel_rank() -> None:
    raw = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, **AUTOTP}
    topology = _topology(tp=2)  # dp 2
    cfg = load_config(_autotp_world_batch(raw, raw, topology, None, None), dp_world_size=topology.size("dp"))
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (4, 2, 1)


@pytest.mark.parametrize("tbs", [4, 6])
def test_other_batches_are_left_for_load_config(tbs: int) -> None:
    raw = {"train_batch_size": tbs, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, **AUTOTP}
    topology = _topology(tp=2)
    assert _autotp_world_batch(raw, raw, topology, None, None) is raw
    if tbs == 6:  # neither dp nor world arithmetic: the usual error
        with pytest.raises(ConfigError, match="train_batch_size 6"):
            load_config(raw, dp_world_size=topology.size("dp"))


def test_untouched_without_autotp_or_with_an_mpu() -> None:
    raw = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, **AUTOTP}
    assert _autotp_world_batch(raw, raw, _topology(tp=1), None, None) is raw
    assert _autotp_world_batch(raw, raw, _topology(tp=2), None, object()) is raw
    megatron = {k: v for k, v in raw.items() if k != "tensor_parallel"}  # a tensor axis not from AutoTP
    assert _autotp_world_batch(megatron, megatron, _topology(tp=2), None, None) is megatron
    two_keys = {k: v for k, v in raw.items() if k != "gradient_accumulation_steps"}  # load_config derives the third
    assert _autotp_world_batch(two_keys, two_keys, _topology(tp=2), None, None) is two_keys
    auto = {**raw, "train_batch_size": "auto"}
    assert _autotp_world_batch(auto, auto, _topology(tp=2), None, None) is auto
