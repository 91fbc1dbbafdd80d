"""Normalise a parsed user config before typed validation: key aliases, deprecated keys, "auto", unknown keys.

One walk over the user's dict, guided by the schema classes:
- deprecated keys are remapped with a warning (``bfloat16`` -> ``bf16``, ``cpu_offload: true`` ->
  ``offload_optimizer: {device: cpu}``, ``stage3_gather_fp16_weights_on_model_save`` -> ...16bit...), silent
  aliases are renamed (``prefetch_bucket_size`` -> ``stage3_prefetch_bucket_size``);
- "auto" values are dropped so the default applies, as DeepSpeed does for Hugging Face configs, and their
  paths recorded (``pipeline.stages: "auto"`` is a real value and is kept);
- unknown keys inside a block are errors with a close-match suggestion; at the top level a near miss of a
  known key (``typos.py``) is an error (DeepSpeed would silently ignore it) and anything else is a warning.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import KIND_CONFLICT, KIND_TYPE, KIND_UNKNOWN_KEY, Problem, join_path, show, suggest
from .schema import BATCH_KEYS, SectionsConfig
from .schema_base import Section
from .typos import near_miss

# Dotted paths where the string "auto" is a meaningful value rather than "use the default".
AUTO_IS_A_VALUE = frozenset({"pipeline.stages"})
# Dict-valued fields whose entries may be "auto" (Hugging Face writes "lr": "auto" etc.).
_PARAM_DICTS = frozenset({"optimizer.params", "scheduler.params"})
# Deprecated top-level keys -> the key that replaced them.
_TOP_DEPRECATED = {"bfloat16": "bf16", "seq_parallel_comm_data_type": "seq_parallel_communication_data_type"}


@dataclass
class Prepared:
    """The normalised dict plus what the walk found."""

    data: dict[str, Any]
    auto_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def is_auto(value: Any) -> bool:
    """True for the Hugging Face placeholder string "auto" (any case)."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def section_class(cls: type[Section], name: str) -> type[Section] | None:
    """The Section subclass a field of ``cls`` holds (unwrapping Optional), or None for scalar fields."""
    info = cls.model_fields.get(name)
    if info is None:
        return None
    if typing.get_origin(info.annotation) is dict:
        return None  # a mapping of sections (see entry_section_class)
    candidates = [info.annotation, *typing.get_args(info.annotation)]
    for ann in candidates:
        if isinstance(ann, type) and issubclass(ann, Section):
            return ann
    return None


def entry_section_class(cls: type[Section], name: str) -> type[Section] | None:
    """For a ``dict[str, Section]`` field (e.g. curriculum_metrics), the Section class of its entries."""
    info = cls.model_fields.get(name)
    if info is None or typing.get_origin(info.annotation) is not dict:
        return None
    value_type = typing.get_args(info.annotation)[-1]
    return value_type if isinstance(value_type, type) and issubclass(value_type, Section) else None


def known_top_level_keys() -> set[str]:
    """Every top-level key shardwise recognises (fields, batch keys, deprecated spellings)."""
    return set(SectionsConfig.model_fields) | set(BATCH_KEYS) | set(_TOP_DEPRECATED) | {"allgather_size"}


def prepare(raw: dict[str, Any]) -> Prepared:
    """Normalise ``raw`` (not modified). Problems are collected in ``Prepared.problems``, not raised."""
    out = Prepared(data={})
    top = copy.deepcopy(raw)
    _legacy_zero_flag(top, out)
    known = known_top_level_keys()
    for key, value in top.items():
        name = _TOP_DEPRECATED.get(key, key)
        if key not in known:
            _unknown_top_level(key, value, known, out)
            continue
        if key == "allgather_size":
            out.warnings.append("allgather_size: only used with the legacy boolean form of zero_optimization; "
                                "ignored. Fix: set zero_optimization.allgather_bucket_size instead.")
            continue
        if name != key:
            if name in top:
                out.problems.append(Problem(key, f"{key}: both '{key}' (deprecated) and '{name}' are given; "
                                            f"DeepSpeed uses '{name}'. Fix: remove '{key}'.", KIND_CONFLICT))
                continue
            out.warnings.append(f"{key}: deprecated key name; read as '{name}'. Fix: rename it to '{name}'.")
        if value is None and section_class(SectionsConfig, name) is not None:
            continue  # "fp16": null means "not configured"
        if is_auto(value):
            out.auto_keys.append(name)
            continue
        out.data[name] = _walk_value(SectionsConfig, name, value, name, out)
    return out


# What DeepSpeed's silent ignoring of a misspelled key would do to the run.
_CONSEQUENCE = {
    "zero_optimization": "ZeRO would be disabled",
    "fp16": "training would run without fp16",
    "bf16": "training would run without bf16",
    "optimizer": "the config's optimizer would not be built",
    "scheduler": "no learning-rate schedule would run",
    "gradient_clipping": "the default clipping (1.0) would apply instead",
    "communication_data_type": "gradients would travel in the training dtype",
}


def _unknown_top_level(key: str, value: Any, known: set[str], out: Prepared) -> None:
    close = near_miss(key, known)
    if close is None:
        out.warnings.append(f"{key}: not a DeepSpeed config key; ignored (DeepSpeed ignores it too).")
        return
    consequence = f" and {_CONSEQUENCE[close]}" if close in _CONSEQUENCE else ""
    fix = f"rename '{key}' to '{close}'"
    if close == "zero_optimization" and not isinstance(value, dict):
        fix = f"write \"zero_optimization\": {{\"stage\": {show(value)}}} instead of '{key}'"
    out.problems.append(Problem(
        key, f"{key}: unknown top-level key; did you mean '{close}'? DeepSpeed would silently ignore "
        f"'{key}'{consequence}; shardwise refuses it. Fix: {fix}.", KIND_UNKNOWN_KEY))


def _legacy_zero_flag(top: dict[str, Any], out: Prepared) -> None:
    # Very old DeepSpeed: "zero_optimization": true meant stage 1 (with top-level "allgather_size").
    flag = top.get("zero_optimization")
    if not isinstance(flag, bool):
        return
    block: dict[str, Any] = {"stage": 1 if flag else 0}
    if flag and "allgather_size" in top:
        block["allgather_bucket_size"] = top.pop("allgather_size")
    top["zero_optimization"] = block
    out.warnings.append(f"zero_optimization: the boolean form is deprecated; read as {show(block)}. "
                        f"Fix: write \"zero_optimization\": {show(block)}.")


def _walk_value(cls: type[Section], name: str, value: Any, path: str, out: Prepared) -> Any:
    sub = section_class(cls, name)
    if sub is not None and isinstance(value, dict):
        return _walk_section(sub, value, path, out)
    entry = entry_section_class(cls, name)
    if entry is not None and isinstance(value, dict):
        return {key: _walk_section(entry, item, join_path(path, key), out) if isinstance(item, dict) else item
                for key, item in value.items()}
    if path in _PARAM_DICTS and isinstance(value, dict):
        kept = {}
        for key, item in value.items():
            if is_auto(item):
                out.auto_keys.append(join_path(path, key))
            else:
                kept[key] = item
        return kept
    return value


def _walk_section(cls: type[Section], data: dict[str, Any], path: str, out: Prepared) -> dict[str, Any]:
    if cls.__name__ == "ZeroConfig":
        data = _legacy_zero_offload(data, path, out)
    result: dict[str, Any] = {}
    allows_extra = cls.model_config.get("extra") == "allow"
    for key, value in data.items():
        name = cls.aliases.get(key) or cls.deprecated.get(key) or key
        key_path = join_path(path, key)
        if key in cls.deprecated:
            out.warnings.append(f"{key_path}: deprecated; read as {join_path(path, name)}. "
                                f"Fix: rename it to '{name}'.")
        if name in result or (name != key and name in data):
            out.problems.append(Problem(key_path, f"{path}: both '{key}' and '{name}' are given (the same "
                                        f"setting). Fix: keep only '{name}'.", KIND_CONFLICT))
            continue
        if is_auto(value) and join_path(path, name) not in AUTO_IS_A_VALUE:
            out.auto_keys.append(join_path(path, name))
            continue
        if name not in cls.model_fields and not allows_extra:
            out.problems.append(_unknown_in_section(cls, key, path))
            continue
        result[name] = _walk_value(cls, name, value, join_path(path, name), out)
    return result


def _unknown_in_section(cls: type[Section], key: str, path: str) -> Problem:
    valid = sorted(set(cls.model_fields) | set(cls.aliases) | set(cls.deprecated))
    close = suggest(key, valid)
    ignored = "" if cls.ds_strict else " DeepSpeed would silently ignore it; shardwise refuses it."
    key_path = join_path(path, key)
    if close is not None:
        msg = f"{key_path}: unknown key; did you mean '{close}'?{ignored} Fix: rename it to '{close}'."
    else:
        shown = ", ".join(valid[:15]) + (", ... (see docs/config.md)" if len(valid) > 15 else "")
        msg = f"{key_path}: unknown key in '{path}'.{ignored} Fix: remove it; valid keys are: {shown}."
    return Problem(key_path, msg, KIND_UNKNOWN_KEY)


def _legacy_zero_offload(data: dict[str, Any], path: str, out: Prepared) -> dict[str, Any]:
    """Remap the deprecated cpu_offload* flags of zero_optimization, as DeepSpeed does (with a warning)."""
    data = dict(data)
    for old, new in (("cpu_offload", "offload_optimizer"), ("cpu_offload_param", "offload_param")):
        if old not in data:
            continue
        flag = data.pop(old)
        old_path = join_path(path, old)
        if not isinstance(flag, bool) and flag is not None:
            out.problems.append(Problem(old_path, f"{old_path} = {show(flag)}: expected true or false. Fix: "
                                        f"write \"{new}\": {{\"device\": \"cpu\"}} instead.", KIND_TYPE))
        elif flag and new in data:
            out.problems.append(Problem(old_path, f"{path}: both the deprecated '{old}' and '{new}' are given. "
                                        f"Fix: remove '{old}'.", KIND_CONFLICT))
        elif flag:
            data[new] = {"device": "cpu"}
            out.warnings.append(f"{old_path} is deprecated; remapped to {path}.{new}.device = \"cpu\". "
                                f"Fix: write \"{new}\": {{\"device\": \"cpu\"}}.")
        else:
            out.warnings.append(f"{old_path} is deprecated (and false here, so it has no effect). Fix: remove it.")
    if "cpu_offload_use_pin_memory" in data:
        data.pop("cpu_offload_use_pin_memory")
        out.warnings.append(f"{path}.cpu_offload_use_pin_memory is deprecated and ignored (DeepSpeed ignores it "
                            "too). Fix: set pin_memory inside offload_optimizer / offload_param (default true).")
    return data
