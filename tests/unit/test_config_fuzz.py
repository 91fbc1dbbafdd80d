"""Config fuzz corpus: every input is refused with a ConfigError naming the key path, the value and a fix, or accepted
(for the reasons documented in docs/reliability_data.md); no builtin exception type (TypeError, RecursionError, ...)
ever reaches the user, from the loader or, for accepted configs, from building an engine and training two steps.

Three parts, all deterministic:
- ``CURATED``: the inputs of issue 15's fault-injection pass (and their neighbours), with the exact outcome expected;
- a sweep over every field of the schema x a list of hostile values (strings, NaN, 1e308, 2**63, nesting, ...);
- every one-letter slip (drop, double, swap, replace) of every top-level key: refused as a typo unless it is a key.
"""

from __future__ import annotations

import copy
import json
import math
import typing

import pytest

from shardwise.config import ConfigError, load_config
from shardwise.config.errors import show
from shardwise.config.prepare import known_top_level_keys, section_class
from shardwise.config.schema import SectionsConfig
from shardwise.config.schema_base import Section
from tests.dist import run_ranks

BASE = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
FP16 = {**BASE, "fp16": {"enabled": True}}
DEEP = json.loads("[" * 200 + "]" * 200)

# name -> (config or JSON text, expected): "ok" (accepted) or (error kind, key path the message must name).
CURATED: dict[str, tuple[typing.Any, typing.Any]] = {
    "loss_scale_window 0": ({**FP16, "fp16": {"enabled": True, "loss_scale_window": 0}},
                            ("type", "fp16.loss_scale_window")),
    "loss_scale_window 0, static scale": ({**FP16, "fp16": {"enabled": True, "loss_scale": 128,
                                                             "loss_scale_window": 0}}, "ok"),
    "loss_scale_window 0, fp16 off": ({**BASE, "fp16": {"enabled": False, "loss_scale_window": 0}}, "ok"),
    "min_loss_scale 0": ({**FP16, "fp16": {"enabled": True, "min_loss_scale": 0}}, ("type", "fp16.min_loss_scale")),
    "min_loss_scale 1e30": ({**FP16, "fp16": {"enabled": True, "min_loss_scale": 1e30}},
                            ("type", "fp16.min_loss_scale")),
    "min_loss_scale above the start": ({**FP16, "fp16": {"enabled": True, "min_loss_scale": 2**20}},
                                       ("conflict", "fp16.min_loss_scale")),
    "initial_scale_power 2000": ({**FP16, "fp16": {"enabled": True, "initial_scale_power": 2000}},
                                 ("type", "fp16.initial_scale_power")),
    "zero_optimization null": ({**BASE, "zero_optimization": None}, "ok"),
    "zero_optimization true": ({**BASE, "zero_optimization": True}, "ok"),
    "lr empty string": ({**BASE, "optimizer": {"type": "Adam", "params": {"lr": ""}}}, ("type", "optimizer.params.lr")),
    "betas string": ({**BASE, "optimizer": {"type": "Adam", "params": {"betas": "0.9"}}},
                     ("type", "optimizer.params.betas")),
    "betas >= 1": ({**BASE, "optimizer": {"type": "Adam", "params": {"betas": [0.9, 1.0]}}},
                   ("type", "optimizer.params.betas")),
    "eps x": ({**BASE, "optimizer": {"type": "Adam", "params": {"eps": "x"}}}, ("type", "optimizer.params.eps")),
    "eps NaN": ({**BASE, "optimizer": {"type": "Adam", "params": {"eps": math.nan}}}, ("type", "optimizer.params.eps")),
    "weight_decay -1e9": ({**BASE, "optimizer": {"type": "Adam", "params": {"weight_decay": -1e9}}},
                          ("type", "optimizer.params.weight_decay")),
    "torch_adam string": ({**BASE, "optimizer": {"type": "Adam", "params": {"torch_adam": "false"}}},
                          ("type", "optimizer.params.torch_adam")),
    "unknown optimizer param": ({**BASE, "optimizer": {"type": "Adam", "params": {"betaz": [0.9, 0.9]}}},
                                "engine:optimizer.params"),
    "cosine total 0": ({**BASE, "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 0}}},
                       ("type", "scheduler.params.total_num_steps")),
    "warmup steps 0": ({**BASE, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}},
                       ("type", "scheduler.params.warmup_num_steps")),
    "micro batch 1e308": ({"train_micro_batch_size_per_gpu": 1e308}, ("type", "train_micro_batch_size_per_gpu")),
    "train_batch_size 2**63": ({"train_batch_size": 2**63}, ("type", "train_batch_size")),
    "train_batch_size 2**40": ({"train_batch_size": 2**40}, ("batch", "train_batch_size")),
    "5000-digit integer": ('{"train_micro_batch_size_per_gpu": ' + "9" * 5000 + "}", ("parse", "")),
    "5000-digit integer in a dict": ({"train_micro_batch_size_per_gpu": 10**5000},
                                     ("type", "train_micro_batch_size_per_gpu")),
    "arrays 50,000 deep": ('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}", ("parse", "")),
    "dict nested 200 deep": ({**BASE, "wandb": {"group": DEEP}}, ("parse", "wandb.group")),
    "non-string key": ({**BASE, 1: 2}, ("type", "1")),
    "non-string nested key": ({**BASE, "fp16": {(1, 2): True}}, ("type", "fp16")),
    "NaN clipping": ({**BASE, "gradient_clipping": math.nan}, ("type", "gradient_clipping")),
    "sequence_parallel_size x": ({**BASE, "sequence_parallel_size": "x"}, ("type", "sequence_parallel_size")),
    "check_grad_overflow false with fp16": ({**FP16, "check_grad_overflow": False},
                                            ("conflict", "check_grad_overflow")),
    "check_grad_overflow fp32": ({**BASE, "check_grad_overflow": True}, "ok"),
    **{f"typo {key}": ({**BASE, key: {"enabled": True}}, ("unknown_key", key))
       for key in ("fp61", "bf61", "optim", "zero", "clip_grad", "comm_data_type", "fp_16", "optimzer", "schedular",
                   "zero_optimisation", "lr_scheduler", "max_grad_norm", "grad_clip")},
    "own key without near match": ({**BASE, "cuda_visible_devices": "0,1"}, "ok"),
    "own key 'data'": ({**BASE, "data": {"path": "/x"}}, "ok"),
    "own key 'train'": ({**BASE, "train": {"epochs": 3}}, "ok"),
}


def _check_message(err: ConfigError, path: str) -> None:
    text = str(err)
    assert type(err) is ConfigError
    assert "fix" in text.lower(), text
    assert err.path.startswith(path), (err.path, text)
    if path:
        assert path.split(".")[0] in text, text


@pytest.mark.parametrize("name", list(CURATED))
def test_curated_input(name):
    config, expected = CURATED[name]
    if expected == "ok" or str(expected).startswith("engine:"):
        load_config(config, log=False)
        return
    kind, path = expected
    with pytest.raises(ConfigError) as info:
        load_config(config, log=False)
    assert info.value.kind == kind, str(info.value)
    _check_message(info.value, path)


# -- the schema sweep ------------------------------------------------------------------------------------------
HOSTILE: list[typing.Any] = ["x", "", "1", "yes", math.nan, math.inf, -math.inf, -1, 0, 0.5, 1e308, 2**63, -(2**63),
                             10**400, [], [1, 2], {}, {"a": 1}, None, True, DEEP]
# Free-form parameter names fuzzed inside optimizer.params / scheduler.params (with a schedule that takes them).
PARAMS = {"optimizer.params": ["lr", "betas", "eps", "weight_decay", "bias_correction", "torch_adam", "adam_w_mode",
                               "amsgrad"],
          "scheduler.params": ["total_num_steps", "warmup_num_steps", "warmup_min_lr", "warmup_max_lr",
                               "warmup_min_ratio", "cos_min_ratio", "last_batch_iteration", "warmup_type"]}
SCHEDULE = {"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2}}
COSINE = {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2}}


def _leaf_paths(cls: type[Section], prefix: str = "") -> list[str]:
    paths = []
    for name in cls.model_fields:
        path = f"{prefix}{name}"
        sub = section_class(cls, name)
        paths.append(path)
        if sub is not None:
            paths += _leaf_paths(sub, path + ".")
    return paths


def _all_paths() -> list[str]:
    paths = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"]
    paths += [p for p in _leaf_paths(SectionsConfig) if p not in ("optimizer.type", "scheduler.type")]
    paths += [f"{block}.{name}" for block, names in PARAMS.items() for name in names]
    return paths


def _with(path: str, value: typing.Any) -> dict:
    config = copy.deepcopy(BASE)
    if path.startswith("scheduler."):
        config["scheduler"] = copy.deepcopy(COSINE if "ratio" in path else SCHEDULE)
    if path.startswith("fp16."):
        config["fp16"] = {"enabled": True}
    node = config
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return config


def _outcome(config: typing.Any) -> tuple[str, typing.Any]:
    try:
        load_config(config, dp_world_size=1, log=False)
    except ConfigError as err:
        return "refused", err
    except Exception as exc:  # noqa: BLE001 - the point of the test: report any other type
        return "raw", exc
    return "ok", None


def test_every_field_with_every_hostile_value():
    raw, unclear, accepted = [], [], 0
    for path in _all_paths():
        for value in HOSTILE:
            status, err = _outcome(_with(path, value))
            if status == "raw":
                raw.append(f"{path} = {show(value)}: {type(err).__name__}: {err}")
            elif status == "refused":
                text = str(err)
                if "fix" not in text.lower() or not err.path or err.path.split(".")[0].split("[")[0] not in text:
                    unclear.append(f"{path} = {show(value)}: {text}")
            else:
                accepted += 1
    assert not raw, "raw exceptions:\n" + "\n".join(raw[:20])
    assert not unclear, "errors without path or fix:\n" + "\n".join(unclear[:20])
    assert accepted > 0  # some hostile values are legal somewhere (0, null, true, ...): the sweep is not vacuous


def _slips(key: str) -> set[str]:
    out = set()
    for i in range(len(key)):
        out.add(key[:i] + key[i + 1:])  # drop
        out.add(key[:i] + key[i] + key[i:])  # double
        if i + 1 < len(key):
            out.add(key[:i] + key[i + 1] + key[i] + key[i + 2:])  # swap
        out.add(key[:i] + ("x" if key[i] != "x" else "y") + key[i + 1:])  # replace
    return out


def test_one_letter_slips_of_top_level_keys_are_refused():
    known = known_top_level_keys()
    missed = []
    for key in sorted(known):
        if len(key) < 4:
            continue  # 'amp', 'aio': a slip of three letters is as likely a key of the user's own
        for slip in sorted(_slips(key) - known):
            status, err = _outcome({**BASE, slip: {}})
            if status != "refused" or err.kind != "unknown_key":
                missed.append(f"{slip} (for {key}): {status}")
    assert not missed, "\n".join(missed[:30])


# -- accepted configs must also build and train -----------------------------------------------------------------
ENGINE_PATHS = ["fp16.loss_scale_window", "fp16.min_loss_scale", "fp16.initial_scale_power", "fp16.hysteresis",
                "fp16.loss_scale", "gradient_clipping", "zero_optimization.stage",
                "zero_optimization.reduce_bucket_size", "zero_optimization.overlap_comm", "communication_data_type",
                "check_grad_overflow", "steps_per_print", "gradient_accumulation_steps",
                "data_types.grad_accum_dtype", "bf16.check_grad_overflow",
                *(f"{block}.{name}" for block, names in PARAMS.items() for name in names)]
ENGINE_VALUES: list[typing.Any] = ["x", math.nan, -1, 0, 0.5, 3, 1e308, 2**62, None, True]


def _build_and_train(configs: list[tuple[str, dict]]) -> dict[str, tuple]:
    """On one rank: build an engine per config and train two steps. label -> ("ok",) / ("config", path, text) /
    ("raw", type name, text)."""
    import torch

    import shardwise
    from tests.models import tiny_mlp

    outcomes: dict[str, tuple] = {}
    for label, config in configs:
        try:
            engine, *_ = shardwise.initialize(model=tiny_mlp(width=4, depth=1), config=config)
            dtype = next(engine.module.parameters()).dtype
            for _ in range(2):
                x = torch.randn(2, 8, dtype=dtype)
                engine.backward(engine(x).float().pow(2).mean())
                engine.step()
            outcomes[label] = ("ok",)
        except ConfigError as err:
            outcomes[label] = ("config", err.path, str(err))
        except Exception as exc:  # noqa: BLE001 - report every other type
            outcomes[label] = ("raw", type(exc).__name__, str(exc))
    return outcomes


def test_accepted_hostile_configs_build_and_train():
    todo = [(name, config) for name, (config, expected) in CURATED.items()
            if expected == "ok" or str(expected).startswith("engine:")]
    for path in ENGINE_PATHS:
        for value in ENGINE_VALUES:
            config = _with(path, value)
            if _outcome(config)[0] == "ok":
                todo.append((f"{path} = {show(value)}", config))
    assert len(todo) > 50
    outcomes = run_ranks(_build_and_train, todo, world_size=1, timeout=240)[0]
    raw = [f"{label}: {o[1]}: {o[2]}" for label, o in outcomes.items() if o[0] == "raw"]
    assert not raw, "\n".join(raw)
    for name, (_, expected) in CURATED.items():
        if str(expected).startswith("engine:"):
            status, path, text = outcomes[name]
            assert status == "config" and path == expected.split(":", 1)[1] and "fix" in text.lower(), outcomes[name]
        elif expected == "ok":
            assert outcomes[name] == ("ok",), outcomes[name]
