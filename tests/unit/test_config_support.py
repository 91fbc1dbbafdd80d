"""The support table: inert blocks accepted (with a warning), active ones refused, one line per feature, and
flipping an entry changes behaviour."""

import dataclasses

import pytest

from shardwise.config import ConfigError, load_config
from shardwise.config import support as support_mod
from shardwise.config.support import FEATURES, Feature, Status, markdown_table

BASE = {"train_batch_size": 4}


def test_initial_implementation_state():
    status = {(f.path, f.status) for f in FEATURES}
    for path in ("zero_optimization.stage", "fp16", "bf16", "pipeline", "activation_checkpointing",
                 "comms_logger", "csv_monitor", "wall_clock_breakdown", "memory_breakdown", "tensorboard", "wandb",
                 "comet", "trackio", "flops_profiler",
                 "zero_optimization.offload_optimizer.device", "zero_optimization.offload_param.device",
                 "zero_optimization.zero_hpz_partition_size", "zero_optimization.zero_quantized_weights",
                 "zero_optimization.zero_quantized_gradients", "communication_data_type", "torch_autocast",
                 "tensor_parallel.autotp_size"):
        assert (path, Status.SUPPORTED) in status, path
    for path in ("amp.enabled", "elasticity.enabled",
                 "data_efficiency.data_sampling.dynamic_batching",
                 "hybrid_engine.enabled", "sparse_gradients", "compile", "nebula.enabled",
                 "zero_optimization.mics_shard_size", "zero_optimization.zenflow", "tensor_parallel.tp.tp_size"):
        assert (path, Status.NOT_YET) in status, path
    for path in ("compression_training", "quantize_training", "progressive_layer_drop",
                 "sparse_attention", "optimizer.type"):
        assert (path, Status.REMOVED) in status, path
    assert ("autotuning.enabled", Status.WARN) in status
    assert ("curriculum_learning", Status.WARN) in status  # legacy block: runs as in DeepSpeed 0.19.6
    for path in ("data_efficiency.data_sampling.curriculum_learning", "data_efficiency.data_routing.random_ltd"):
        assert (path, Status.SUPPORTED) in status, path


@pytest.mark.parametrize("block", [
    {"amp": {"enabled": False}}, {"elasticity": {"enabled": False}},
    {"hybrid_engine": {"enabled": False}},
    {"data_efficiency": {"data_sampling": {"dynamic_batching": {"enabled": False}}}},
    {"sparse_attention": {}}, {"progressive_layer_drop": {"enabled": False}},
])
def test_inert_unsupported_block_is_accepted_with_a_warning(block):
    cfg = load_config({**BASE, **block}, log=False)
    name = next(iter(block))
    if block[name]:
        assert any(w.startswith(name) and "present but inactive" in w for w in cfg.warnings), cfg.warnings


def test_defaults_produce_no_support_warnings():
    cfg = load_config({**BASE, "zero_optimization": {"stage": 3, "mics_shard_size": -1},
                       "gradient_allreduce_op": "mean", "data_types": {"grad_accum_dtype": "fp32"}}, log=False)
    assert cfg.warnings == ()


def test_supported_optimizer_names():
    for name in ("Adam", "adamw", "SGD", "Lamb", "Adagrad", "Lion", "RMSprop", "NAdam"):
        cfg = load_config({**BASE, "optimizer": {"type": name, "params": {"lr": 0.1}}}, log=False)
        assert cfg.optimizer.type == name
    with pytest.raises(ConfigError, match="is not supported yet"):
        load_config({**BASE, "optimizer": {"type": "rmsprop"}})  # torch names are case-sensitive, as in DeepSpeed


def test_scheduler_names():
    for name in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest", "StepLR"):
        assert load_config({**BASE, "scheduler": {"type": name}}).scheduler.type == name
    with pytest.raises(ConfigError, match="scheduler.type"):
        load_config({**BASE, "scheduler": {"type": "WarmupLinear"}})


def test_warn_status_accepts_active_value_with_warning():
    cfg = load_config({**BASE, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu",
                                                                                        "ratio": 0.3}}}, log=False)
    assert cfg.zero_optimization.offload_optimizer.ratio == 0.3
    assert any("partial offload" in w for w in cfg.warnings)


def test_all_problems_of_a_config_are_listed():
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, "amp": {"enabled": True}, "sparse_attention": {"mode": "fixed"},
                     "hybrid_engine": {"enabled": True}})
    assert {p.path for p in info.value.problems} == {"amp.enabled", "sparse_attention", "hybrid_engine.enabled"}
    assert {p.kind for p in info.value.problems} == {"unsupported", "removed"}


def test_refused_feature_is_reported_before_batch_arithmetic():
    with pytest.raises(ConfigError) as info:  # no batch keys at all: the removed feature is the real cause
        load_config({"quantize_training": {"enabled": True}, "fp16": {"enabled": True}})
    assert info.value.kind == "removed"


def test_flipping_an_entry_changes_behaviour(monkeypatch):
    flipped = tuple(dataclasses.replace(f, status=Status.SUPPORTED) if f.path == "hybrid_engine.enabled" else f
                    for f in FEATURES)
    monkeypatch.setattr(support_mod, "FEATURES", flipped)
    assert load_config({**BASE, "hybrid_engine": {"enabled": True}}).hybrid_engine.enabled is True


def test_every_non_supported_path_resolves_in_the_schema():
    from shardwise.config.schema import SectionsConfig

    cfg = SectionsConfig(zero_optimization={"offload_optimizer": {}, "offload_param": {}},
                         optimizer={"type": "Adam"}, scheduler={"type": "WarmupLR"})
    for feat in FEATURES:
        if feat.status in (Status.NOT_YET, Status.REMOVED, Status.WARN):
            assert support_mod._lookup(cfg, feat.path) is not support_mod._MISSING, feat.path


def test_markdown_table_has_one_row_per_feature():
    table = markdown_table().splitlines()
    assert len(table) == len(FEATURES) + 2
    assert "| `amp.enabled` | not yet | false |" in "\n".join(table)


def test_docs_show_the_current_table():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    assert markdown_table() in docs, (
        "docs/config.md's support table is out of date: paste the output of "
        "`python -c 'from shardwise.config.support import markdown_table; print(markdown_table())'` into it")


def test_feature_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FEATURES[0].status = Status.NOT_YET  # type: ignore[misc]
    assert isinstance(FEATURES[0], Feature)
