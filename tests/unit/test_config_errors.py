"""Every class of config error: the message names the key path, the value and the fix, and err.kind says which."""

import pytest

from shardwise.config import ConfigError, load_config

BASE = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4}


def _error(config, dp=1):
    with pytest.raises(ConfigError) as info:
        load_config(config, dp_world_size=dp, log=False)
    return info.value


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_top_level_typo_is_refused_with_suggestion_and_consequence():
    err = _error({**BASE, "zero_optimisation": {"stage": 2}})
    text = str(err)
    assert err.kind == "unknown_key" and err.path == "zero_optimisation"
    assert "did you mean 'zero_optimization'" in text
    assert "ZeRO would be disabled" in text  # what DeepSpeed would silently have done
    assert "Fix: rename 'zero_optimisation' to 'zero_optimization'" in text


def test_top_level_case_typo_is_a_near_miss():
    err = _error({**BASE, "FP16": {"enabled": True}})
    assert err.kind == "unknown_key" and "did you mean 'fp16'" in str(err)


def test_unrelated_top_level_key_is_only_a_warning():
    cfg = load_config({**BASE, "cuda_visible_devices": "0,1"}, log=False)
    assert any("cuda_visible_devices" in w and "ignored" in w for w in cfg.warnings)


def test_nested_typo_names_path_and_suggestion():
    err = _error({**BASE, "zero_optimization": {"stage": 2, "reduce_bucket_sise": 5e8}})
    assert err.kind == "unknown_key"
    assert err.path == "zero_optimization.reduce_bucket_sise"
    assert "did you mean 'reduce_bucket_size'?" in str(err)


def test_nested_typo_deep_in_offload_block():
    err = _error({**BASE, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_mem": True}}})
    assert err.path == "zero_optimization.offload_param.pin_mem"
    assert "did you mean 'pin_memory'?" in str(err)


def test_nested_typo_in_block_deepspeed_does_not_validate_says_so():
    err = _error({**BASE, "activation_checkpointing": {"partition_activation": True}})
    assert "did you mean 'partition_activations'" in str(err)
    assert "DeepSpeed would silently ignore it" in str(err)


def test_unknown_key_without_near_match_lists_valid_keys():
    err = _error({**BASE, "bf16": {"enabled": True, "xyzzy": 1}})
    assert err.path == "bf16.xyzzy"
    assert "valid keys are:" in str(err) and "check_grad_overflow" in str(err)


def test_stage3_short_alias_accepted_like_deepspeed():
    cfg = load_config({**BASE, "zero_optimization": {"stage": 3, "prefetch_bucket_size": 1000}}, log=False)
    assert cfg.zero_optimization.stage3_prefetch_bucket_size == 1000


def test_alias_and_canonical_key_both_given_is_a_conflict():
    err = _error({**BASE, "zero_optimization": {"stage3_prefetch_bucket_size": 1, "prefetch_bucket_size": 2}})
    assert err.kind == "conflict" and "keep only 'stage3_prefetch_bucket_size'" in str(err)


@pytest.mark.parametrize(
    ("config", "path", "expected"),
    [
        ({"train_batch_size": "eight"}, "train_batch_size", "expected an integer"),
        ({**BASE, "fp16": {"enabled": "yes"}}, "fp16.enabled", "expected true or false"),
        ({**BASE, "zero_optimization": {"stage": 4}}, "zero_optimization.stage", "one of 0, 1, 2 or 3"),
        ({**BASE, "zero_optimization": {"reduce_bucket_size": 1.5}}, "zero_optimization.reduce_bucket_size",
         "fractional part"),
        ({**BASE, "gradient_clipping": "1.0"}, "gradient_clipping", "expected a number"),
        ({**BASE, "zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
         "zero_optimization.offload_optimizer.device", "'none', 'cpu' or 'nvme'"),
        ({**BASE, "zero_optimization": {"stage": 3, "offload_optimizer": {"ratio": 1.5}}},
         "zero_optimization.offload_optimizer.ratio", "<= 1"),
        ({**BASE, "fp16": True}, "fp16", "JSON object"),
        ({**BASE, "optimizer": {"params": {"lr": 1e-3}}}, "optimizer.type", "missing"),
        ({**BASE, "checkpoint": {"tag_validation": "Sometimes"}}, "checkpoint.tag_validation", '"Warn"'),
    ],
)
def test_wrong_type_names_key_value_and_expectation(config, path, expected):
    err = _error(config)
    assert err.kind == "type"
    assert err.path == path
    assert expected in str(err)
    assert "Fix:" in str(err)
    assert "pydantic" not in str(err).lower() and "errors.pydantic.dev" not in str(err)


def test_all_type_errors_are_reported_together():
    err = _error({"train_batch_size": "eight", "fp16": {"enabled": "yes"}, "steps_per_print": -1})
    assert {p.path for p in err.problems} == {"train_batch_size", "fp16.enabled", "steps_per_print"}
    assert str(err).startswith("3 problems in the config:")


def test_integral_floats_are_accepted_for_int_fields():
    cfg = load_config({**BASE, "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8,
                                                     "allgather_bucket_size": 2e8}}, log=False)
    assert cfg.zero_optimization.reduce_bucket_size == 500_000_000
    assert isinstance(cfg.zero_optimization.allgather_bucket_size, int)


def test_inconsistent_batch_triad_quotes_the_arithmetic():
    err = _error({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                  "gradient_accumulation_steps": 2}, dp=2)
    assert err.kind == "batch"
    assert str(err) == ("train_batch_size 32 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2 x "
                        "data-parallel size 2 = 16; fix one of them (e.g. gradient_accumulation_steps: 4).")


def test_batch_written_for_fewer_ranks_explains_the_zero_accumulation():
    err = _error({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 16}, dp=2)
    text = str(err)
    assert err.kind == "batch" and err.path == "gradient_accumulation_steps"
    assert "16 x data-parallel size 2 = 32" in text
    assert "Gradient accumulation steps: 0" in text
    assert "written for fewer ranks" in text and "fits data-parallel size 1." in text
    assert "train_micro_batch_size_per_gpu to 8" in text


def test_batch_not_divisible_by_dp():
    err = _error({"train_batch_size": 15}, dp=2)
    assert err.kind == "batch"
    assert "train_batch_size 15 is not a multiple of" in str(err) and "= 7.5" in str(err)


def test_missing_batch_keys():
    err = _error({"gradient_accumulation_steps": 4, "fp16": {"enabled": True}}, dp=4)
    assert err.kind == "batch"
    assert "Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided" in str(err)
    assert '"train_micro_batch_size_per_gpu": 4' in str(err)


def test_missing_batch_keys_because_auto_says_who_fills_auto():
    err = _error({"train_micro_batch_size_per_gpu": "auto"})
    assert "is \"auto\"" in str(err) and "Hugging Face Trainer" in str(err)


def test_zero_batch_value_is_refused():
    err = _error({"train_batch_size": 0})
    assert err.kind == "batch" and "must be a positive integer" in str(err)


@pytest.mark.parametrize(
    ("block", "path", "hint"),
    [
        ({"amp": {"enabled": True, "opt_level": "O1"}}, "amp.enabled", 'use the "bf16" or "fp16" block'),
        ({"hybrid_engine": {"enabled": True}}, "hybrid_engine.enabled", "hybrid engine"),
        ({"elasticity": {"enabled": True}}, "elasticity.enabled", "batch keys"),
        ({"zero_optimization": {"stage": 3, "mics_shard_size": 8}}, "zero_optimization.mics_shard_size", "MiCS"),
        ({"tensor_parallel": {"tp": {"tp_size": 2}}}, "tensor_parallel.tp.tp_size", "autotp_size"),
        ({"compile": {"deepcompile": True}}, "compile", "torch.compile"),
        ({"sparse_gradients": True}, "sparse_gradients", "sparse"),
        ({"optimizer": {"type": "MuAdam", "params": {}}}, "optimizer.type", "torch.optim"),
    ],
)
def test_not_supported_yet_names_path_value_and_alternative(block, path, hint):
    err = _error({**BASE, **block})
    assert err.kind == "unsupported" and err.path == path
    assert f"{path}" in str(err) and "is not supported yet by shardwise (" in str(err)
    assert hint in str(err) and "Fix:" in str(err)


@pytest.mark.parametrize(
    ("block", "path"),
    [
        ({"sparse_attention": {"mode": "fixed", "block": 16}}, "sparse_attention"),
        ({"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}}, "optimizer.type"),
        ({"optimizer": {"type": "ZeroOneAdam", "params": {}}}, "optimizer.type"),
        ({"optimizer": {"type": "OnebitLamb", "params": {}}}, "optimizer.type"),
        ({"progressive_layer_drop": {"enabled": True, "theta": 0.5}}, "progressive_layer_drop"),
        ({"quantize_training": {"enabled": True}}, "quantize_training"),
        ({"compression_training": {"weight_quantization": {"shared_parameters": {"enabled": True}}}},
         "compression_training"),
    ],
)
def test_features_removed_by_deepspeed_are_refused_specifically(block, path):
    err = _error({**BASE, **block})
    assert err.kind == "removed" and err.path == path
    assert "DeepSpeed 0.19.8 itself removed" in str(err) and "Fix:" in str(err)


def test_one_bit_refusal_suggests_adam():
    assert '"Adam"' in str(_error({**BASE, "optimizer": {"type": "OneBitAdam"}}))


def test_inactive_removed_block_is_accepted_with_warning():
    cfg = load_config({**BASE, "progressive_layer_drop": {"enabled": False, "theta": 0.5}}, log=False)
    assert any(w.startswith("progressive_layer_drop: present but inactive") for w in cfg.warnings)


def test_legacy_curriculum_block_runs_with_a_warning_and_is_checked():
    block = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 64,
             "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 10, "difficulty_step": 8}}
    cfg = load_config({**BASE, "curriculum_learning": block}, log=False)
    assert cfg.curriculum_learning.enabled and any("DeepSpeed 0.19.8 removed this legacy block" in w
                                                   for w in cfg.warnings)
    err = _error({**BASE, "curriculum_learning": {**block, "schedule_config": {"difficulty_step": 8}}})
    assert err.path == "curriculum_learning.schedule_config.total_curriculum_step" and "Fix:" in str(err)
    assert load_config({**BASE, "curriculum_learning": {"enabled": False}}, log=False).warnings == ()


def test_fp16_and_bf16_both_enabled():
    err = _error({**BASE, "fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert err.kind == "conflict" and "fp16.enabled and bf16.enabled are both true" in str(err)


@pytest.mark.parametrize(
    ("config", "path", "needle"),
    [
        ({"amp": {"enabled": True}, "zero_optimization": {"stage": 2}}, "amp.enabled", "cannot be combined with ZeRO"),
        ({"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}},
         "fp16.fp16_master_weights_and_grads", "needs zero_optimization.stage 1, 2 or 3"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
         "zero_optimization.offload_optimizer.ratio", "only allowed with zero_optimization.stage 3"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
         "zero_optimization.offload_param.device", "needs zero_optimization.stage 3 (stage is 2)"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
         "zero_optimization.offload_param.nvme_path", "nvme_path is not set"),
        ({"optimizer": {"type": "Adam", "params": {"max_grad_norm": 1.0}}}, "optimizer.params.max_grad_norm",
         "set the top-level \"gradient_clipping\": 1.0"),
        ({"gradient_allreduce_op": "sum", "zero_optimization": {"stage": 3}}, "gradient_allreduce_op", "stage 3"),
    ],
)
def test_cross_checks(config, path, needle):
    err = _error({**BASE, **config})
    paths = [p.path for p in err.problems]
    assert path in paths
    assert needle in str(err)


def test_deprecated_cpu_offload_is_remapped_with_warning():
    cfg = load_config({**BASE, "zero_optimization": {"stage": 2, "cpu_offload": True}}, log=False)
    assert cfg.zero_optimization.offload_optimizer.device == "cpu"
    assert cfg.zero_optimization.offload_optimizer.pin_memory is True  # 0.19 default
    assert any("cpu_offload is deprecated" in w and "offload_optimizer" in w for w in cfg.warnings)


def test_deprecated_cpu_offload_together_with_new_block_is_a_conflict():
    err = _error({**BASE, "zero_optimization": {"stage": 2, "cpu_offload": True,
                                                "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}}})
    assert err.kind == "conflict" and "remove 'cpu_offload'" in str(err)


def test_deprecated_gather_fp16_weights_is_remapped():
    cfg = load_config({**BASE, "zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}},
                      log=False)
    assert cfg.zero_optimization.stage3_gather_16bit_weights_on_model_save is True
    assert any("stage3_gather_fp16_weights_on_model_save: deprecated" in w for w in cfg.warnings)


def test_bfloat16_alias_is_read_as_bf16_with_warning():
    cfg = load_config({**BASE, "bfloat16": {"enabled": True}}, log=False)
    assert cfg.bf16.enabled is True
    assert any(w.startswith("bfloat16: deprecated") for w in cfg.warnings)


def test_legacy_boolean_zero_optimization():
    cfg = load_config({**BASE, "zero_optimization": True}, log=False)
    assert cfg.zero_optimization.stage == 1
    assert any("boolean form is deprecated" in w for w in cfg.warnings)


def test_none_source_names_the_ways_to_pass_a_config():
    err = _error(None)
    assert err.kind == "source"
    assert "--deepspeed_config" in str(err) and "base64" in str(err) and "config=" in str(err)


def test_missing_file_is_a_source_error():
    err = _error("/nonexistent/ds_config.json")
    assert err.kind == "source" and "no such file" in str(err)


def test_bad_dp_world_size():
    err = _error(BASE, dp=0)
    assert "dp_world_size" in str(err)
