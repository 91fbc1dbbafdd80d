"""load_config(): any accepted config source -> a validated, resolved, frozen ShardwiseConfig.

The steps, in order (each collects every problem it finds before raising one ConfigError):
1. read the source into a dict (``sources.py``: dict, path, base64, argparse Namespace);
2. normalise keys (``prepare.py``: deprecated aliases, "auto", unknown keys);
3. validate types of every block (pydantic, errors rewritten with dotted paths);
4. cross-field rules (``checks.py``) and the support table (``support.py``) -- before the batch arithmetic, so
   a refused feature (e.g. elasticity, which replaces the batch keys) is reported as the real cause;
5. resolve the batch triad for the data-parallel size (``batch.py``);
6. build the frozen ShardwiseConfig and log the warnings to logging.getLogger("shardwise.config").
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .batch import resolve_batch
from .checks import cross_checks
from .errors import KIND_SOURCE, ConfigError, Problem, problems_from_validation
from .prepare import prepare
from .schema import BATCH_KEYS, SectionsConfig, ShardwiseConfig
from .schema_base import Int
from .sources import read_source
from .support import check_support

logger = logging.getLogger("shardwise.config")

_INT = TypeAdapter(Int)


def load_config(source: Any, dp_world_size: int = 1, *, log: bool = True) -> ShardwiseConfig:
    """Load, validate and resolve a DeepSpeed-style config for ``dp_world_size`` data-parallel ranks.

    ``source`` may be a dict, a path to a JSON/hjson file, a urlsafe-base64 JSON string, an
    ``argparse.Namespace`` with ``deepspeed_config`` (see ``add_config_arguments``), or a ShardwiseConfig (re-
    resolved from its ``raw``). Raises ConfigError (a ValueError) naming the key, the value and the fix.
    Warnings (deprecated keys, ignored keys, inert unsupported blocks) are logged unless ``log`` is false, and
    are always available as ``cfg.warnings``.
    """
    if isinstance(dp_world_size, bool) or not isinstance(dp_world_size, int) or dp_world_size < 1:
        raise ConfigError(f"dp_world_size = {dp_world_size!r}: expected a positive integer (the data-parallel "
                          "size the batch keys are resolved for).", path="dp_world_size", kind=KIND_SOURCE)
    notes: list[str] = []
    raw = source.raw if isinstance(source, ShardwiseConfig) else read_source(source, notes)
    cfg = _resolve(raw, dp_world_size, notes)
    if log:
        for warning in cfg.warnings:
            logger.warning(warning)
        if cfg.auto_keys:
            logger.info('"auto" values replaced by their defaults: %s', ", ".join(cfg.auto_keys))
    return cfg


def read_config_dict(source: Any) -> dict[str, Any]:
    """The user's config as a plain dict, before validation (the engine reads the parallel sizes from it first)."""
    return dict(source.raw) if isinstance(source, ShardwiseConfig) else read_source(source, [])


def autotp_size(raw: dict[str, Any]) -> int:
    """``tensor_parallel.autotp_size`` of a raw config (0 when absent: AutoTP training off), validated: like the
    sequence-parallel size, it shapes the process grid before the rest of the config is resolved."""
    block = raw.get("tensor_parallel")
    value = block.get("autotp_size") if isinstance(block, dict) else None
    return _grid_size(value, "tensor_parallel.autotp_size", absent=0, minimum=0,
                      expected="0 (off) or the tensor-parallel degree", fix="set it to 0, 1 or more, or remove it")


def sequence_parallel_size(raw: dict[str, Any]) -> int:
    """``sequence_parallel_size`` of a raw config (1 when absent, null or "auto"), validated: the engine needs it to
    build the device mesh before the rest of the config can be resolved for the data-parallel size."""
    return _grid_size(raw.get("sequence_parallel_size"), "sequence_parallel_size", absent=1, minimum=1,
                      expected="a positive integer (the Ulysses degree)", fix="set it to 1 or more, or remove it")


def _grid_size(value: Any, path: str, *, absent: int, minimum: int, expected: str, fix: str) -> int:
    """A process-grid degree read before the config is resolved: ``absent`` for a missing, null or "auto" value,
    else an integer of at least ``minimum`` (a ConfigError naming ``path`` otherwise)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return absent
    try:
        size = _INT.validate_python(value)
    except ValidationError as exc:
        raise ConfigError.from_problems(problems_from_validation(exc, prefix=path)) from None
    if size < minimum:
        raise ConfigError(f"{path} = {size}: expected {expected}. Fix: {fix}.", path=path)
    return size


def _validate_batch_keys(data: dict[str, Any], problems: list[Problem]) -> dict[str, int | None]:
    values: dict[str, int | None] = {}
    for key in BATCH_KEYS:
        value = data.pop(key, None)
        if value is None:
            values[key] = None
            continue
        try:
            values[key] = _INT.validate_python(value)
        except ValidationError as exc:
            problems.extend(problems_from_validation(exc, prefix=key))
            values[key] = None
    return values


def _resolve(raw: dict[str, Any], dp: int, notes: list[str]) -> ShardwiseConfig:
    prepared = prepare(raw)
    if prepared.problems:
        raise ConfigError.from_problems(prepared.problems)
    data = dict(prepared.data)
    problems: list[Problem] = []
    batch = _validate_batch_keys(data, problems)
    try:
        sections = SectionsConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc))
        sections = None
    if problems or sections is None:
        raise ConfigError.from_problems(problems)
    support_problems, support_warnings = check_support(sections, prepared.data)
    problems = support_problems + cross_checks(sections)  # a refused feature is the more basic cause
    if problems:
        raise ConfigError.from_problems(problems)
    tbs, micro, gas = resolve_batch(batch["train_batch_size"], batch["train_micro_batch_size_per_gpu"],
                                    batch["gradient_accumulation_steps"], dp, prepared.auto_keys)
    fields = {name: getattr(sections, name) for name in SectionsConfig.model_fields}
    return ShardwiseConfig(
        **fields, train_batch_size=tbs, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas,
        dp_world_size=dp, raw=copy.deepcopy(raw), auto_keys=tuple(prepared.auto_keys),
        warnings=tuple(notes + prepared.warnings + support_warnings))
