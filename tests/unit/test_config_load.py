"""Config sources (dict, file, base64, argparse, ShardwiseConfig), DeepSpeed 0.19 defaults, "auto", the batch
triad, the frozen result, to_dict() and add_config_arguments."""

import argparse
import base64
import json
import logging
import sys
import types

import pydantic
import pytest

from shardwise.config import ConfigError, ShardwiseConfig, add_config_arguments, load_config

SMALL = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "fp16": {"enabled": True}}


def _write(tmp_path, text, name="ds_config.json"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_dict_source_and_resolved_triad():
    cfg = load_config(SMALL, dp_world_size=2)
    assert isinstance(cfg, ShardwiseConfig)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (16, 4, 2)
    assert cfg.dp_world_size == 2 and cfg.fp16.enabled is True


def test_file_source(tmp_path):
    path = _write(tmp_path, json.dumps(SMALL))
    assert load_config(str(path)).gradient_accumulation_steps == 4
    assert load_config(path).gradient_accumulation_steps == 4  # os.PathLike too


def test_base64_source():
    encoded = base64.urlsafe_b64encode(json.dumps(SMALL).encode()).decode()
    cfg = load_config(encoded, dp_world_size=4)
    assert cfg.gradient_accumulation_steps == 1 and cfg.raw == SMALL


def test_base64_without_padding_is_accepted():
    encoded = base64.urlsafe_b64encode(json.dumps(SMALL).encode()).decode().rstrip("=")
    assert load_config(encoded).train_batch_size == 16


def test_namespace_source_from_add_config_arguments(tmp_path):
    path = _write(tmp_path, json.dumps(SMALL))
    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(path)])
    assert args.deepspeed is True
    assert load_config(args, dp_world_size=2).gradient_accumulation_steps == 2


def test_namespace_with_deprecated_deepscale_config(tmp_path):
    path = _write(tmp_path, json.dumps(SMALL))
    args = add_config_arguments(argparse.ArgumentParser()).parse_args(["--deepscale_config", str(path)])
    cfg = load_config(args, log=False)
    assert cfg.train_batch_size == 16
    assert any("--deepscale_config is deprecated" in w for w in cfg.warnings)


def test_namespace_without_config_is_an_error():
    args = add_config_arguments(argparse.ArgumentParser()).parse_args(["--deepspeed"])
    with pytest.raises(ConfigError, match="no --deepspeed_config"):
        load_config(args)


def test_add_config_arguments_flags_and_shardwise_alias():
    parser = argparse.ArgumentParser()
    assert add_config_arguments(parser) is parser
    args = parser.parse_args(["--shardwise_config", "a.json", "--deepscale"])
    assert (args.deepspeed_config, args.deepscale, args.deepspeed, args.deepscale_config) == ("a.json", True, False,
                                                                                              None)


def test_shardwise_config_source_is_re_resolved():
    cfg = load_config(SMALL, dp_world_size=2)
    again = load_config(cfg, dp_world_size=4)
    assert again.gradient_accumulation_steps == 1 and cfg.gradient_accumulation_steps == 2


def test_reresolve_for_another_dp_world_size():
    cfg = load_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4})
    assert load_config(cfg, dp_world_size=4).gradient_accumulation_steps == 2
    with pytest.raises(ConfigError, match="data-parallel size 16"):
        load_config(cfg, dp_world_size=16)


def test_json_text_source():
    assert load_config(json.dumps(SMALL)).train_batch_size == 16


def test_duplicate_keys_in_file(tmp_path):
    path = _write(tmp_path, '{"train_batch_size": 8, "fp16": {"enabled": true}, "fp16": {"enabled": false}}')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.kind == "parse"
    assert str(info.value).startswith("Duplicate keys in config: 'fp16'")
    assert "Fix: merge" in str(info.value)


def test_unsubstituted_template_placeholder_is_pointed_at(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hjson", None)  # force the plain-JSON path
    path = _write(tmp_path, '{\n  "train_batch_size": CONFIG_BATCH_SIZE,\n  "steps_per_print": 10\n}')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert info.value.kind == "parse" and "line 2 column 23" in text
    assert "'CONFIG_BATCH_SIZE' looks like an unsubstituted template placeholder" in text


def test_comment_without_hjson_is_explained(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hjson", None)
    path = _write(tmp_path, '{\n  // batch\n  "train_batch_size": 8\n}')
    with pytest.raises(ConfigError, match="install the 'hjson' package"):
        load_config(path)


def test_hjson_is_used_when_installed(tmp_path, monkeypatch):
    calls = []

    def loads(text, object_pairs_hook=None):
        calls.append(object_pairs_hook)
        return json.loads(text, object_pairs_hook=object_pairs_hook)

    fake = types.SimpleNamespace(loads=loads, HjsonDecodeError=ValueError)
    monkeypatch.setitem(sys.modules, "hjson", fake)
    path = _write(tmp_path, json.dumps(SMALL))
    assert load_config(path).train_batch_size == 16
    assert len(calls) == 1 and calls[0] is not None  # duplicate-key hook passed, as DeepSpeed does


def test_top_level_must_be_an_object(tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(_write(tmp_path, "[1, 2]"))


def test_deepspeed_019_defaults():
    cfg = load_config({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}})
    zero = cfg.zero_optimization
    assert cfg.gradient_clipping == 1.0
    assert cfg.steps_per_print is None
    assert cfg.zero_force_ds_cpu_optimizer is True and cfg.zero_allow_untested_optimizer is False
    assert zero.offload_optimizer.pin_memory is True and zero.offload_param.pin_memory is True
    assert zero.stage3_prefetch_bucket_size == 50_000_000
    assert zero.reduce_bucket_size == 500_000_000 and zero.sub_group_size == 1_000_000_000
    assert zero.overlap_comm is True  # None -> True
    assert zero.offload_param.buffer_count == 5 and zero.offload_optimizer.buffer_count == 4
    assert cfg.bf16.check_grad_overflow is True
    assert cfg.fp16.initial_scale_power == 16 and cfg.fp16.loss_scale == 0.0
    assert cfg.checkpoint.tag_validation == "Warn" and cfg.checkpoint.async_save is False
    assert cfg.pipeline.stages == "auto" and cfg.pipeline.partition == "best"
    assert cfg.comms_logger.prof_all is True and cfg.optimizer is None and cfg.data_parallel_size is None


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_overlap_comm_default_is_what_the_engine_does(stage):
    # null or absent: on at every stage (DeepSpeed turns it on for stage 3 only; see docs/zero.md)
    for zero in ({"stage": stage, "overlap_comm": None}, {"stage": stage}):
        cfg = load_config({"train_batch_size": 1, "zero_optimization": zero})
        assert cfg.zero_optimization.overlap_comm is True


def test_auto_values_take_defaults_and_are_listed():
    cfg = load_config({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.1}},
        "pipeline": {"stages": "auto"},
    }, dp_world_size=2, log=False)
    assert set(cfg.auto_keys) == {
        "train_batch_size", "gradient_accumulation_steps", "gradient_clipping", "fp16.enabled",
        "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
        "optimizer.params.lr"}
    assert cfg.train_batch_size == 4 and cfg.gradient_accumulation_steps == 1
    assert cfg.zero_optimization.reduce_bucket_size == 500_000_000  # as DeepSpeed: auto -> default
    assert cfg.optimizer.params == {"weight_decay": 0.1}
    assert cfg.pipeline.stages == "auto"  # a real value here, not a placeholder


def test_auto_keys_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="shardwise.config"):
        load_config({"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": "auto"}})
    assert any("fp16.enabled" in r.getMessage() and "auto" in r.getMessage() for r in caplog.records)


def test_warnings_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="shardwise.config"):
        cfg = load_config({"train_batch_size": 2, "cuda_visible_devices": "0"})
    assert cfg.warnings and [r.getMessage() for r in caplog.records] == list(cfg.warnings)


@pytest.mark.parametrize(
    ("given", "dp", "triad"),
    [
        ({"train_batch_size": 32}, 4, (32, 8, 1)),
        ({"train_micro_batch_size_per_gpu": 3}, 4, (12, 3, 1)),
        ({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}, 2, (12, 3, 2)),
        ({"train_batch_size": 24, "gradient_accumulation_steps": 3}, 2, (24, 4, 3)),
        ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 2}, 3, (24, 2, 4)),
        ({"train_batch_size": 24, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 6}, 2,
         (24, 2, 6)),
    ],
)
def test_batch_triad(given, dp, triad):
    cfg = load_config(given, dp_world_size=dp)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == triad


def test_config_is_frozen():
    cfg = load_config(SMALL)
    with pytest.raises(pydantic.ValidationError):
        cfg.train_batch_size = 3
    with pytest.raises(pydantic.ValidationError):
        cfg.zero_optimization.stage = 3


def test_raw_is_a_copy_of_the_user_dict():
    user = {"train_batch_size": 8, "zero_optimization": {"stage": 1}}
    cfg = load_config(user)
    user["zero_optimization"]["stage"] = 3
    assert cfg.raw["zero_optimization"]["stage"] == 1 and cfg.zero_optimization.stage == 1


def test_to_dict_is_json_and_round_trips():
    cfg = load_config({**SMALL, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
                       "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                       "amp": {"enabled": False, "opt_level": "O1"}}, dp_world_size=2, log=False)
    data = cfg.to_dict()
    assert list(data)[:3] == ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"]
    assert "raw" not in data and "warnings" not in data and "dp_world_size" not in data
    text = json.dumps(data)
    again = load_config(json.loads(text), dp_world_size=2, log=False)
    assert again.to_dict() == data
    assert data["zero_optimization"]["offload_param"]["pin_memory"] is True
    assert data["amp"]["opt_level"] == "O1"


def test_every_field_has_a_description():
    from shardwise.config import schema, schema_data, schema_monitor, schema_precision, schema_training, schema_zero
    from shardwise.config.schema_base import Section

    missing = []
    for module in (schema, schema_data, schema_monitor, schema_precision, schema_training, schema_zero):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Section) and obj is not Section:
                missing += [f"{obj.__name__}.{n}" for n, f in obj.model_fields.items() if not f.description]
    assert missing == []


def test_stage_given_as_float_is_accepted():
    assert load_config({"train_batch_size": 1, "zero_optimization": {"stage": 2.0}}).zero_optimization.stage == 2


def test_dtype_spellings_are_folded():
    cfg = load_config({"train_batch_size": 1, "communication_data_type": "bfloat16",
                       "data_types": {"grad_accum_dtype": "torch.float32"}})
    assert cfg.communication_data_type == "bf16" and cfg.data_types.grad_accum_dtype == "fp32"
