"""``CurriculumScheduler``: the difficulty of a curriculum at each step (``deepspeed.runtime.data_pipeline.
curriculum_scheduler.CurriculumScheduler``). Pure arithmetic: no torch, no I/O.

Schedules (DeepSpeed 0.19's semantics, difficulty d(s) at step s, between ``min_difficulty`` and
``max_difficulty``):

* ``fixed_linear``: ``d = floor((s / total_curriculum_step) * (max - min) + min)``, then rounded down to a multiple
  of ``difficulty_step`` and capped at ``max``;
* ``fixed_root``: the same with ``(s / total) ** (1 / root_degree)`` (degree 2 grows fast early, then slowly);
* ``fixed_discrete``: ``difficulty[i]`` for the first ``i`` with ``s <= max_step[i]``; the last difficulty after
  ``max_step[-1]``;
* ``custom``: a function ``step -> difficulty`` set with ``set_custom_get_difficulty`` (the engine's
  ``set_custom_curriculum_learning_schedule``).

``update_difficulty(s)`` moves the current difficulty only while it is below the maximum, so a difficulty never
comes back down once the maximum is reached. The state is a plain dict with DeepSpeed's keys (checkpointable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete", "custom")
_NEEDS = {
    "fixed_linear": ("total_curriculum_step", "difficulty_step"),
    "fixed_root": ("total_curriculum_step", "difficulty_step", "root_degree"),
    "fixed_discrete": ("difficulty", "max_step"),
    "custom": (),
}


def _as_mapping(config: Any) -> dict[str, Any]:
    """A DeepSpeed-style dict from a dict or a typed config section (``model_dump``), unset keys dropped."""
    if isinstance(config, Mapping):
        data = dict(config)
    elif hasattr(config, "model_dump"):
        data = config.model_dump()
    else:
        raise TypeError(f"a curriculum config must be a dict or a config section, got {type(config).__name__}")
    sched = data.get("schedule_config") or {}
    data["schedule_config"] = {k: v for k, v in dict(sched).items() if v is not None}
    return data


class CurriculumScheduler:
    """Difficulty as a function of the step, for one curriculum metric (or the legacy seqlen curriculum)."""

    def __init__(self, config: Any) -> None:
        cfg = _as_mapping(config)
        for key in ("min_difficulty", "max_difficulty", "schedule_type"):
            if cfg.get(key) is None:
                raise ValueError(f"curriculum learning needs '{key}' in its config; add it (see "
                                 "docs/data_efficiency.md)")
        kind = cfg["schedule_type"]
        if kind not in SCHEDULE_TYPES:
            raise ValueError(f"curriculum schedule_type {kind!r} is not one of {', '.join(SCHEDULE_TYPES)}")
        sched = cfg["schedule_config"]
        missing = [k for k in _NEEDS[kind] if k not in sched]
        if missing:
            raise ValueError(f"curriculum schedule_type {kind!r} needs schedule_config keys {missing}")
        if kind == "fixed_discrete" and len(sched["difficulty"]) != len(sched["max_step"]) + 1:
            raise ValueError("fixed_discrete needs one more 'difficulty' than 'max_step' entries, got "
                             f"{len(sched['difficulty'])} and {len(sched['max_step'])}")
        self.state: dict[str, Any] = {
            "min_difficulty": cfg["min_difficulty"], "max_difficulty": cfg["max_difficulty"],
            "current_difficulty": cfg["min_difficulty"], "schedule_type": kind, "schedule_config": dict(sched),
        }
        self.custom_get_difficulty: Callable[[int], Any] | None = None

    # -- DeepSpeed's accessors ------------------------------------------------------------------------------------
    def get_current_difficulty(self) -> Any:
        """The difficulty of the current step."""
        return self.state["current_difficulty"]

    def set_current_difficulty(self, difficulty: Any) -> None:
        """Force the current difficulty."""
        self.state["current_difficulty"] = difficulty

    def set_custom_get_difficulty(self, schedule_function: Callable[[int], Any]) -> None:
        """The ``step -> difficulty`` function of a ``custom`` schedule."""
        self.custom_get_difficulty = schedule_function

    def get_state(self) -> dict[str, Any]:
        """The scheduler state (a dict with DeepSpeed's keys)."""
        return self.state

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a state from ``get_state``."""
        self.state = state

    # -- the schedules -----------------------------------------------------------------------------------------------
    def _root(self, step: int, degree: float) -> Any:
        sc = self.state["schedule_config"]
        lo, hi = self.state["min_difficulty"], self.state["max_difficulty"]
        fraction = (float(step) / sc["total_curriculum_step"]) ** (1.0 / degree)
        value = math.floor(fraction * (hi - lo) + lo)
        value -= value % sc["difficulty_step"]
        return min(value, hi)

    def _discrete(self, step: int) -> Any:
        sc = self.state["schedule_config"]
        for difficulty, last_step in zip(sc["difficulty"], sc["max_step"]):
            if step <= last_step:
                return difficulty
        return sc["difficulty"][-1]

    def get_difficulty(self, global_steps: int) -> Any:
        """The schedule's difficulty at ``global_steps`` (not capped by the current one)."""
        kind = self.state["schedule_type"]
        if kind == "fixed_discrete":
            return self._discrete(global_steps)
        if kind == "fixed_linear":
            return self._root(global_steps, 1.0)
        if kind == "fixed_root":
            return self._root(global_steps, self.state["schedule_config"]["root_degree"])
        if self.custom_get_difficulty is None:
            raise RuntimeError("curriculum schedule_type 'custom' needs a schedule function: call "
                               "engine.set_custom_curriculum_learning_schedule({metric: fn}) (or "
                               "scheduler.set_custom_get_difficulty(fn)) before training")
        return self.custom_get_difficulty(global_steps)

    def update_difficulty(self, global_steps: int) -> Any:
        """Advance to ``global_steps`` (while below the maximum) and return the current difficulty."""
        if self.state["current_difficulty"] < self.state["max_difficulty"]:
            self.state["current_difficulty"] = self.get_difficulty(global_steps)
        return self.state["current_difficulty"]


__all__ = ["SCHEDULE_TYPES", "CurriculumScheduler"]
