"""Checks of the free-form ``optimizer.params`` and ``scheduler.params``, by hyperparameter name.

These blocks are keyword arguments for a constructor the config does not know (any ``torch.optim`` class may be
named), so their keys are checked against the class when the engine builds it. Their *values* are checked here, for
the names every optimizer and DeepSpeed schedule uses, so that ``shardwise-check-config`` catches ``"lr": ""``,
``"betas": "0.9"``, ``"eps": NaN`` or ``"weight_decay": -1e9`` instead of a TypeError or silent nonsense at step 1.
The bounds are torch's own (``torch.optim.Adam`` refuses a negative lr, eps or weight decay, and betas outside
[0, 1)) and DeepSpeed's (its schedules refuse non-positive step sizes); a value is never converted, only judged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .errors import KIND_TYPE, Problem, join_path, show
from .schema_base import INT_LIMIT

Rule = Callable[[Any], "str | None"]  # the expectation the value fails, or None when it is fine


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    try:
        return _number(value) and math.isfinite(value)
    except OverflowError:  # an integer beyond float range
        return False


def at_least(bound: float) -> Rule:
    """A finite number >= ``bound``."""
    return lambda v: None if _finite(v) and v >= bound else f"a finite number >= {bound:g}"


def in_unit(upper_open: bool) -> Rule:
    """A finite number in [0, 1) (``upper_open``) or [0, 1]."""
    text = "[0, 1)" if upper_open else "[0, 1]"
    return lambda v: None if _finite(v) and 0 <= v and (v < 1 if upper_open else v <= 1) else f"a number in {text}"


def finite(v: Any) -> str | None:
    """Any finite number."""
    return None if _finite(v) else "a finite number"


def integer(minimum: int, nullable: bool = False, strict: bool = False) -> Rule:
    """An integer >= ``minimum``; integral floats such as 1e3 count unless ``strict`` (the constructor demands int)."""
    def rule(v: Any) -> str | None:
        if v is None and nullable:
            return None
        whole = isinstance(v, int) if strict else _finite(v) and float(v).is_integer()
        ok = _number(v) and whole and minimum <= v <= INT_LIMIT
        return None if ok else f"an integer >= {minimum}" + (" or null" if nullable else "")
    return rule


def boolean(nullable: bool = False) -> Rule:
    """A JSON boolean (a string "false" would be truthy in Python)."""
    text = "true or false" + (" (or null)" if nullable else "")
    return lambda v: None if isinstance(v, bool) or (nullable and v is None) else text


def per_group(rule: Rule, nullable: bool = False) -> Rule:
    """``rule`` for a scalar, or for every entry of a list (one value per optimizer parameter group)."""
    def check(v: Any) -> str | None:
        if v is None and nullable:
            return None
        values = v if isinstance(v, (list, tuple)) and v else [v]
        failed = next((r for r in map(rule, values) if r is not None), None)
        return None if failed is None else f"{failed}, or a list of such values (one per parameter group)"
    return check


def text(v: Any) -> str | None:
    """A string (its allowed words are the constructor's business)."""
    return None if isinstance(v, str) else "a string"


def betas(v: Any) -> str | None:
    """Adam-style betas: two numbers in [0, 1)."""
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_finite(b) and 0 <= b < 1 for b in v)
    return None if ok else "a list of two numbers in [0, 1), e.g. [0.9, 0.999]"


OPTIMIZER_RULES: dict[str, Rule] = {
    "lr": at_least(0), "eps": at_least(0), "weight_decay": at_least(0), "momentum": at_least(0),
    "dampening": at_least(0), "betas": betas, "max_coeff": at_least(0), "min_coeff": at_least(0),
    "amsgrad": boolean(), "nesterov": boolean(), "bias_correction": boolean(), "torch_adam": boolean(),
    "adam_w_mode": boolean(), "maximize": boolean(), "capturable": boolean(), "differentiable": boolean(),
    "foreach": boolean(nullable=True), "fused": boolean(nullable=True),
}
_LR = per_group(at_least(0))
SCHEDULER_RULES: dict[str, Rule] = {
    "total_num_steps": integer(1), "warmup_num_steps": integer(1, strict=True), "last_batch_iteration": integer(-1),
    "warmup_min_lr": _LR, "warmup_max_lr": per_group(at_least(0), nullable=True),
    "warmup_min_ratio": in_unit(False), "cos_min_ratio": in_unit(False),
    "cycle_min_lr": _LR, "cycle_max_lr": _LR, "decay_lr_rate": at_least(0),
    "cycle_first_step_size": integer(1), "cycle_second_step_size": integer(1, nullable=True),
    "cycle_first_stair_count": integer(0), "cycle_second_stair_count": integer(0, nullable=True),
    "decay_step_size": integer(0), "cycle_momentum": boolean(), "cycle_min_mom": in_unit(True),
    "cycle_max_mom": in_unit(True), "decay_mom_rate": at_least(0),
    "lr_range_test_min_lr": _LR, "lr_range_test_step_size": integer(1), "lr_range_test_step_rate": finite,
    "lr_range_test_staircase": boolean(), "warmup_type": text,
}


def check_params(path: str, params: dict[str, Any], rules: dict[str, Rule]) -> list[Problem]:
    """One Problem per value in ``params`` (at dotted ``path``) that its rule refuses; unknown names pass."""
    problems = []
    for key, value in params.items():
        rule = rules.get(key)
        expected = rule(value) if rule is not None else None
        if expected is not None:
            where = join_path(path, key)
            fix = ("write it as a JSON value without quotes" if isinstance(value, str)
                   else "change the value (torch and DeepSpeed use these bounds too)")
            problems.append(Problem(where, f"{where} = {show(value)}: expected {expected}. Fix: {fix}.", KIND_TYPE))
    return problems
