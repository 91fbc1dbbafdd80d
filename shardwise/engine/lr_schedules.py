"""DeepSpeed's learning-rate schedules, same names, parameters and numbers.

Owns ``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle`` and ``LRRangeTest`` (the
``"scheduler": {"type": ..., "params": {...}}`` config block, DeepSpeed 0.19's
``deepspeed/runtime/lr_schedules.py``) and :func:`build_scheduler`.

Conventions shared by all five, as in DeepSpeed: ``last_batch_iteration`` counts optimizer steps
already taken (-1 before training). The engine calls ``step()`` after every optimizer step, which
advances the counter and writes the new lr into every param group. The constructor (when
``last_batch_iteration == -1``) writes the lr that the first optimizer step will use: WarmupLR and
WarmupDecayLR start at ``warmup_min_lr``, LRRangeTest at ``lr_range_test_min_lr``, OneCycle at
``cycle_min_lr``, and WarmupCosineLR at 0 (DeepSpeed's value before its first ``step()``, whatever
``warmup_min_ratio`` is). ``state_dict()`` holds only ``last_batch_iteration``; the lr itself is
restored with the optimizer's state.

Warmup shapes over ``warmup_num_steps`` = N (forced to at least 2), at iteration t < N:
``log``: gamma = ln(t + 1) / ln(N); ``linear``: gamma = t / N; then gamma = 1. An unknown
``warmup_type`` falls back to ``log`` with a warning, as DeepSpeed does.
"""

from __future__ import annotations

import abc
import difflib
import inspect
import logging
import math
from typing import Any

import torch

logger = logging.getLogger(__name__)

WARMUP_LOG_RATE = "log"
WARMUP_LINEAR_RATE = "linear"
VALID_LR_SCHEDULES = ["LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR"]


def _param_groups_owner(optimizer: Any) -> Any:
    """The object holding ``param_groups``: a torch optimizer, or a wrapper's ``.optimizer``."""
    if isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "param_groups"):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if inner is not None and hasattr(inner, "param_groups"):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer (it has no param_groups)")


def _set_lrs(param_groups: list[dict], lrs: list[float]) -> list[float]:
    """Write ``lrs`` into the groups; a tensor lr (capturable/fused optimizers) is filled in place."""
    for group, lr in zip(param_groups, lrs):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    return [float(lr) for lr in lrs]


def _per_group(optimizer: Any, value: Any, name: str) -> list:
    """A scalar repeated for every param group, or a list/tuple with one value per group."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values but the optimizer has {n} param groups")
        return list(value)
    return [value] * n


def _check_warmup_steps(warmup_num_steps: Any) -> None:
    if not isinstance(warmup_num_steps, int) or warmup_num_steps <= 0:
        raise ValueError(f"warmup_num_steps must be a positive integer, got {warmup_num_steps!r}")


def _warmup_type(warmup_type: str) -> str:
    if warmup_type not in (WARMUP_LOG_RATE, WARMUP_LINEAR_RATE):
        logger.warning("unknown warmup_type %r (expected 'log' or 'linear'); using 'log' as DeepSpeed does",
                       warmup_type)
        return WARMUP_LOG_RATE
    return warmup_type


class _Schedule(abc.ABC):
    """Iteration counter, ``step``, ``get_last_lr`` and state dict shared by every schedule."""

    def __init__(self, optimizer: Any, last_batch_iteration: int) -> None:
        self.optimizer = _param_groups_owner(optimizer)
        self.last_batch_iteration = last_batch_iteration
        self._last_lr: list[float] | None = None

    @abc.abstractmethod
    def get_lr(self) -> list[float]:
        """The lr of each param group at ``last_batch_iteration``."""

    def _apply(self) -> None:
        self._last_lr = _set_lrs(self.optimizer.param_groups, self.get_lr())

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance to ``last_batch_iteration`` (default: the next one) and set the lr."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The lrs last written to the optimizer."""
        if self._last_lr is None:
            raise RuntimeError(f"{type(self).__name__}.get_last_lr(): no lr set yet; call step() first")
        return self._last_lr

    def state_dict(self) -> dict:
        """``{'last_batch_iteration': n}``, DeepSpeed's format."""
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd: dict) -> None:
        """Restore the iteration counter (the lr comes back with the optimizer's state)."""
        self.last_batch_iteration = sd["last_batch_iteration"]


class WarmupLR(_Schedule):
    """Warm the lr up from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``, then hold.

    ``warmup_max_lr=None`` takes each param group's current lr. Values may be per-group lists.
    """

    def __init__(self, optimizer: Any, warmup_min_lr: float = 0.0, warmup_max_lr: float | None = None,
                 warmup_num_steps: int = 1000, warmup_type: str = WARMUP_LOG_RATE,
                 last_batch_iteration: int = -1) -> None:
        _check_warmup_steps(warmup_num_steps)
        super().__init__(optimizer, last_batch_iteration)
        if warmup_max_lr is None:
            warmup_max_lr = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.min_lrs = _per_group(self.optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(self.optimizer, warmup_max_lr, "warmup_max_lr")
        self.delta_lrs = [hi - lo for hi, lo in zip(self.max_lrs, self.min_lrs)]
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = _warmup_type(warmup_type)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        if last_batch_iteration == -1:
            self._apply()

    def _warmup_gamma(self) -> float:
        if self.warmup_type == WARMUP_LOG_RATE:
            return self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
        return self.last_batch_iteration / self.warmup_num_steps

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return 1.0

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._get_gamma()
        return [lo + delta * gamma for lo, delta in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to 0 at ``total_num_steps``."""

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_lr: float = 0.0,
                 warmup_max_lr: float = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = WARMUP_LOG_RATE, last_batch_iteration: int = -1) -> None:
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            logger.warning("total_num_steps %s is less than warmup_num_steps %s", total_num_steps,
                           warmup_num_steps)

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        remaining = float(self.total_num_steps - self.last_batch_iteration)
        return max(0.0, remaining / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_Schedule):
    """Warm the lr ratio up from ``warmup_min_ratio`` to 1, then cosine-decay it to ``cos_min_ratio``.

    The ratio multiplies each param group's lr at construction time. Past ``total_num_steps`` the
    ratio stays at ``cos_min_ratio``.
    """

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001,
                 warmup_type: str = WARMUP_LOG_RATE, last_batch_iteration: int = -1) -> None:
        _check_warmup_steps(warmup_num_steps)
        super().__init__(optimizer, last_batch_iteration)
        self.total_num_steps = total_num_steps
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = _warmup_type(warmup_type)
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        if self.total_num_steps < self.warmup_num_steps:
            logger.warning("total_num_steps %s is less than warmup_num_steps %s", total_num_steps,
                           warmup_num_steps)
        self.org_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        if last_batch_iteration == -1:
            self._apply()

    def get_lr_ratio(self) -> float:
        """The multiplier of the original lrs at ``last_batch_iteration``."""
        t = self.last_batch_iteration
        if t < 0:
            return 0.0
        if t < self.warmup_num_steps:
            if self.warmup_type == WARMUP_LOG_RATE:
                ratio = self.inverse_log_warm_up * math.log(t + 1)
            else:
                ratio = t / self.warmup_num_steps
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        done = t - self.warmup_num_steps + 1
        span = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, done / span)
        cosine = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.org_lrs]
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]


class LRRangeTest(_Schedule):
    """Grow the lr from ``lr_range_test_min_lr`` by ``step_rate`` per ``step_size`` iterations.

    lr = min_lr * (1 + step_rate * interval), interval = (t + 1) / step_size, floored when
    ``lr_range_test_staircase`` is true.
    """

    def __init__(self, optimizer: Any, lr_range_test_min_lr: float = 1e-3, lr_range_test_step_size: int = 2000,
                 lr_range_test_step_rate: float = 1.0, lr_range_test_staircase: bool = False,
                 last_batch_iteration: int = -1) -> None:
        if not lr_range_test_step_size or lr_range_test_step_size <= 0:
            raise ValueError(f"LRRangeTest: lr_range_test_step_size={lr_range_test_step_size!r} must be a positive "
                             "number of iterations (scheduler.params.lr_range_test_step_size)")
        super().__init__(optimizer, last_batch_iteration)
        self.min_lr = _per_group(self.optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = lr_range_test_step_size
        self.step_rate = lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(self.optimizer.param_groups, self.min_lr)

    def _interval(self) -> float:
        interval = float(self.last_batch_iteration + 1) / self.step_size
        return math.floor(interval) if self.staircase else interval

    def get_lr(self) -> list[float]:
        increase = 1 + self.step_rate * self._interval()
        return [lr * increase for lr in self.min_lr]

    def step(self, batch_iteration: int | None = None) -> None:
        """Advance to ``batch_iteration`` (default: the next one) and set the lr."""
        super().step(batch_iteration)


class OneCycle(_Schedule):
    """1Cycle: lr rises from ``cycle_min_lr`` to ``cycle_max_lr`` and back, then optionally decays.

    The cycle is ``cycle_first_step_size`` iterations up and ``cycle_second_step_size`` (default:
    the same) down; stair counts > 0 move lr in that many flat steps per half instead of every
    iteration. After the cycle, with ``decay_step_size`` and ``decay_lr_rate`` non-zero,
    lr = cycle_min_lr / (1 + decay_lr_rate * k / decay_step_size) at the k-th iteration past it.

    With ``cycle_momentum`` (and an optimizer whose defaults have ``betas``) beta1 cycles the
    opposite way, from ``cycle_max_mom`` down to ``cycle_min_mom`` and back. As in DeepSpeed,
    beta2 is set to 0.99 throughout, and the constructor sets ``betas = (cycle_min_mom, 0.99)``.
    """

    def __init__(self, optimizer: Any, cycle_min_lr: float, cycle_max_lr: float, decay_lr_rate: float = 0.0,
                 cycle_first_step_size: int = 2000, cycle_second_step_size: int | None = None,
                 cycle_first_stair_count: int = 0, cycle_second_stair_count: int | None = None,
                 decay_step_size: int = 0, cycle_momentum: bool = True, cycle_min_mom: float = 0.8,
                 cycle_max_mom: float = 0.9, decay_mom_rate: float = 0.0, last_batch_iteration: int = -1) -> None:
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        for name, size in (("cycle_first_step_size", first), ("cycle_second_step_size", second)):
            if not size > 0:
                raise ValueError(f"OneCycle: {name}={size:g} must be a positive number of iterations "
                                 f"(scheduler.params.{name})")
        super().__init__(optimizer, last_batch_iteration)
        self.first_step_size, self.second_step_size = first, second
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = (cycle_first_stair_count if cycle_second_stair_count is None
                                   else cycle_second_stair_count)
        self.decay_step_size = decay_step_size
        no_decay = math.isclose(decay_step_size, 0)
        self.min_lrs = _per_group(self.optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group(self.optimizer, cycle_max_lr, "cycle_max_lr")
        self.decay_lr_rate = decay_lr_rate
        self.skip_lr_decay = no_decay or math.isclose(decay_lr_rate, 0)
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(self.optimizer.param_groups, self.min_lrs)
        self.cycle_momentum = cycle_momentum
        self.decay_mom_rate = decay_mom_rate
        self.skip_mom_decay = no_decay or math.isclose(decay_mom_rate, 0)
        if cycle_momentum and "betas" not in getattr(self.optimizer, "defaults", {}):
            logger.warning("OneCycle: cycle_momentum disabled because %s has no 'betas' in its defaults",
                           type(self.optimizer).__name__)
            self.cycle_momentum = False
        if self.cycle_momentum:
            self.min_moms = [(m, 0.99) for m in _per_group(self.optimizer, cycle_min_mom, "cycle_min_mom")]
            self.max_moms = [(m, 0.99) for m in _per_group(self.optimizer, cycle_max_mom, "cycle_max_mom")]
            if last_batch_iteration == -1:
                for betas, group in zip(self.min_moms, self.optimizer.param_groups):
                    group["betas"] = betas

    def _scale_factor(self) -> float:
        """Position in the cycle as a fraction of the way from min to max lr (0..1)."""
        it = self.last_batch_iteration + 1
        cycle = math.floor(1 + it / self.total_size)
        x = 1.0 + it / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:
            # Quantise from the integer position in the cycle, not from `scale`: at a half-cycle
            # boundary the float scale can sit 1e-16 below a stair and floor a whole stair lower.
            pos = it % self.total_size
            if pos <= self.first_step_size:
                stair = pos * stairs / self.first_step_size
            else:
                stair = (self.total_size - pos) * stairs / self.second_step_size
            scale = math.floor(stair) / stairs
        return scale

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        k = self.last_batch_iteration - self.total_size + 1
        factor = 1 + self.decay_lr_rate * (k / self.decay_step_size)
        return [lo / factor for lo in self.min_lrs]

    def get_mom(self) -> list[tuple[float, float]] | None:
        """The ``betas`` of each param group at ``last_batch_iteration`` (None without cycling)."""
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [(hi[0] - (hi[0] - lo[0]) * scale, lo[1]) for lo, hi in zip(self.min_moms, self.max_moms)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        k = self.last_batch_iteration - self.total_size + 1
        factor = 1 + self.decay_mom_rate * (k / self.decay_step_size)
        return [(b0 * factor, b1) for b0, b1 in self.max_moms]

    def step(self, batch_iteration: int | None = None) -> None:
        """Advance to ``batch_iteration`` (default: the next one); set lr and, if cycling, betas."""
        super().step(batch_iteration)
        if self.cycle_momentum:
            for group, betas in zip(self.optimizer.param_groups, self.get_mom()):
                group["betas"] = betas


_SCHEDULES: dict[str, type] = {
    "WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle, "LRRangeTest": LRRangeTest,
}


def _torch_schedulers() -> dict[str, type]:
    mod = torch.optim.lr_scheduler
    bases = tuple(b for b in (getattr(mod, "LRScheduler", None), getattr(mod, "ReduceLROnPlateau", None)) if b)
    return {n: c for n, c in vars(mod).items() if inspect.isclass(c) and issubclass(c, bases) and not n.startswith("_")
            and c is not getattr(mod, "LRScheduler", None)}


def _resolve_scheduler(sched_type: str) -> type:
    if sched_type in _SCHEDULES:
        return _SCHEDULES[sched_type]
    torch_scheds = _torch_schedulers()
    if sched_type in torch_scheds:  # DeepSpeed falls back to torch.optim.lr_scheduler by exact name
        return torch_scheds[sched_type]
    every = {**torch_scheds, **_SCHEDULES}
    for name, cls in every.items():
        if name.lower() == str(sched_type).lower():
            return cls
    close = difflib.get_close_matches(str(sched_type), list(every), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown scheduler type '{sched_type}'. Supported: {', '.join(VALID_LR_SCHEDULES)}, or any "
                     f"torch.optim.lr_scheduler class (e.g. CosineAnnealingLR, StepLR).{hint}")


def build_scheduler(sched_type: str, params: dict | None, optimizer: Any) -> Any:
    """Build the schedule a config's ``"scheduler"`` block names, checking parameter names.

    ``sched_type`` is one of DeepSpeed's names (``WarmupLR``...) or a ``torch.optim.lr_scheduler``
    class name; ``params`` are its keyword arguments (the optimizer is passed separately).
    """
    cls = _resolve_scheduler(sched_type)
    params = dict(params or {})
    sig = inspect.signature(cls.__init__)
    accepted = [n for i, n in enumerate(sig.parameters) if i >= 2
                and sig.parameters[n].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    for key in params:
        if key not in accepted and not takes_kwargs:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"scheduler '{cls.__name__}' got unknown parameter '{key}'; accepted parameters: "
                             f"{', '.join(accepted)}.{hint}")
    missing = [n for n in accepted if sig.parameters[n].default is inspect.Parameter.empty and n not in params]
    if missing:
        raise ValueError(f"scheduler '{cls.__name__}' needs parameter(s) {', '.join(missing)} in "
                         "\"scheduler\": {\"params\": {...}}")
    return cls(optimizer, **params)


__all__ = ["LRRangeTest", "OneCycle", "VALID_LR_SCHEDULES", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR",
           "build_scheduler"]
