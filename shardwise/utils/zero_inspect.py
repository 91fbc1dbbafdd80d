"""The ZeRO inspection API (``deepspeed.utils.safe_get_full_fp32_param`` and friends), for every ZeRO stage.

Everything here goes through the sharding strategy's ``fragments(param)`` / ``state_group`` API (see
``zero/fragments.py``): a rank's fragments are the ranges of the flattened parameter it holds, and the fragments of
the ranks in ``state_group`` cover each element exactly once. So a full value is one all-reduce over
``state_group`` of a zero buffer into which each rank has copied its fragments (exact: every element has exactly
one non-zero contributor), and a write touches only this rank's fragments. No stage-specific code lives here.

Semantics follow DeepSpeed 0.19:

* ``safe_get_full_*`` and ``safe_set_full_*`` are called on **every** rank of the data-parallel group (the getters
  communicate; the setters expect the same full ``value`` everywhere). They return/accept tensors shaped like the
  full parameter (``ds_shape`` for a ZeRO-3 parameter), in fp32. A parameter no strategy manages (frozen, or not
  given to the optimizer) gives None.
* Gradients are the reduced, data-parallel **average** the optimizer will step on, after ``backward()`` of an
  accumulation boundary and before ``step()`` (ZeRO-2/3: after any ``backward()``, the running average so far).
  As in DeepSpeed, an fp16 gradient still carries the loss scale (``engine.get_loss_scale()``) and is not clipped.
* ``safe_set_full_fp32_param`` writes the fp32 master weights; the model's 16-bit copy follows at the next optimizer
  step, as in DeepSpeed (without a master copy, i.e. fp32 stage 0, the parameter itself is written).
* The ``*_local_*`` variants are DeepSpeed's ZeRO-3-only API; here they work on every stage: "local" is the
  concatenation, in element order, of this rank's fragments (1-D, fp32, padding excluded; empty when this rank
  holds no piece of the parameter). They never communicate.

Optimizer state exists once the optimizer has stepped (torch optimizers create it lazily; DeepSpeed creates it at
initialisation), so ``*_optimizer_state`` before the first step raises a ValueError saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from shardwise import comm
from shardwise.zero.fragments import Fragment
from shardwise.zero.owners import owner_of

if TYPE_CHECKING:
    from shardwise.engine.strategy import ShardingStrategy


__all__ = [
    "safe_get_full_fp32_param",
    "safe_get_full_grad",
    "safe_get_full_optimizer_state",
    "safe_get_local_fp32_param",
    "safe_get_local_grad",
    "safe_get_local_optimizer_state",
    "safe_set_full_fp32_param",
    "safe_set_full_grad",
    "safe_set_full_optimizer_state",
    "safe_set_local_fp32_param",
    "safe_set_local_grad",
    "safe_set_local_optimizer_state",
    "safe_update_full_grad_vectorized",
]

Picker = Callable[[Fragment], "torch.Tensor | None"]


# -- helpers ------------------------------------------------------------------------------------------------------
def _strategy(param: torch.nn.Parameter) -> Any | None:
    if not getattr(param, "requires_grad", False):
        return None
    return owner_of(param)


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    return torch.Size(getattr(param, "ds_shape", None) or param.shape)


def _grad_divisor(strategy: ShardingStrategy) -> int:
    """Fragments hold gradients summed over this many replicas; DeepSpeed reports their average."""
    return strategy.grad_reduce_size


def _finish(strategy: ShardingStrategy) -> None:
    # in-flight reductions land in the gradient fragments (idempotent; step() calls it again)
    strategy.finish_gradients()


def _state_picker(key: str) -> Picker:
    return lambda f: f.state.get(key)


def _grad_picker(f: Fragment) -> torch.Tensor | None:
    return f.grad


def _fp32_picker(f: Fragment) -> torch.Tensor | None:
    return f.fp32


def _missing(what: str, param: torch.nn.Parameter, strategy: ShardingStrategy) -> ValueError:
    shape = tuple(_full_shape(param))
    if what.startswith("optimizer state"):
        have = sorted({k for f in strategy.fragments(param) for k in f.state})
        known = f"this rank's keys for it are {have}" if have else "this rank holds no state for it"
        return ValueError(f"{what} is not available for the parameter of shape {shape} ({known}): either the "
                          "optimizer keeps no such state, or it has not stepped yet (torch optimizers create their "
                          "state at the first step(); call this after the first engine.step())")
    return ValueError(f"{what} is not available for the parameter of shape {shape}: gradients exist after "
                      "engine.backward() and before engine.step()")


def _gather(param: torch.nn.Parameter, strategy: ShardingStrategy, pick: Picker, what: str) -> torch.Tensor:
    """Assemble the full fp32 tensor from every rank's fragments (one all-reduce over ``state_group``).

    One extra element carries a "this rank had everything asked for" flag, so that a missing piece (state not
    created yet, no gradient) is detected identically on every rank and all of them raise: none is left waiting.
    """
    shape = _full_shape(param)
    numel = shape.numel()
    group = strategy.state_group
    buf = torch.zeros(numel + 1, dtype=torch.float32, device=param.device)
    complete = True
    for f in strategy.fragments(param):
        value = pick(f)
        if value is None:
            complete = False
            continue
        buf[f.start : f.end].copy_(value.reshape(-1))
    buf[numel] = 1.0 if complete else 0.0
    comm.all_reduce(buf, group=group)
    if int(buf[numel].item()) != group.size:
        raise _missing(what, param, strategy)
    return buf[:numel].view(shape)


def _scatter(param: torch.nn.Parameter, strategy: ShardingStrategy, pick: Picker, value: torch.Tensor, what: str,
             scale: float = 1.0) -> None:
    """Write this rank's fragments from the full ``value`` (no communication)."""
    shape = _full_shape(param)
    if value.numel() != shape.numel():
        raise ValueError(f"{what}: value has {value.numel()} elements ({tuple(value.shape)}), the parameter has "
                         f"{shape.numel()} ({tuple(shape)}); pass a tensor shaped like the full parameter")
    flat = value.detach().reshape(-1)
    for f in strategy.fragments(param):
        target = pick(f)
        if target is None:
            raise _missing(what, param, strategy)
        piece = flat[f.start : f.end]
        target.copy_(piece * scale if scale != 1.0 else piece)


def _local(param: torch.nn.Parameter, strategy: ShardingStrategy, pick: Picker, what: str,
           scale: float = 1.0) -> torch.Tensor:
    """This rank's fragments, concatenated in element order (fp32 copy)."""
    pieces = []
    for f in sorted(strategy.fragments(param), key=lambda f: f.start):
        value = pick(f)
        if value is None:
            raise _missing(what, param, strategy)
        pieces.append(value.reshape(-1).to(torch.float32))
    if not pieces:
        return torch.zeros(0, dtype=torch.float32, device=param.device)
    out = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
    return out.mul_(scale) if scale != 1.0 else out


def _set_local(param: torch.nn.Parameter, strategy: ShardingStrategy, pick: Picker, value: torch.Tensor, what: str,
               scale: float = 1.0) -> None:
    frags = sorted(strategy.fragments(param), key=lambda f: f.start)
    held = sum(f.numel for f in frags)
    if value.numel() != held:
        raise ValueError(f"{what}: value has {value.numel()} elements but this rank holds {held} of the parameter "
                         "(read the local piece with the matching safe_get_local_* first to see its size)")
    flat = value.detach().reshape(-1)
    offset = 0
    for f in frags:
        target = pick(f)
        if target is None:
            raise _missing(what, param, strategy)
        piece = flat[offset : offset + f.numel]
        target.copy_(piece * scale if scale != 1.0 else piece)
        offset += f.numel


# -- full values (collective) ----------------------------------------------------------------------------------------
def safe_get_full_fp32_param(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The full fp32 (master) value of ``param``, shaped like it; None if no ZeRO strategy manages it.

    Collective: call on every rank of the data-parallel group.
    """
    strategy = _strategy(param)
    if strategy is None:
        return None
    return _gather(param, strategy, _fp32_picker, "the fp32 master value")


def safe_set_full_fp32_param(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite ``param``'s fp32 master value with the full ``value`` (the same on every rank).

    The model's 16-bit copy picks the new value up at the next optimizer step, as in DeepSpeed.
    """
    strategy = _strategy(param)
    if strategy is not None:
        _scatter(param, strategy, _fp32_picker, value, "safe_set_full_fp32_param")


def safe_get_full_optimizer_state(param: torch.nn.Parameter, optim_state_key: str) -> torch.Tensor | None:
    """The full fp32 optimizer state ``optim_state_key`` (e.g. ``"exp_avg"``) of ``param``; None if unmanaged.

    Collective: call on every rank of the data-parallel group.
    """
    strategy = _strategy(param)
    if strategy is None:
        return None
    return _gather(param, strategy, _state_picker(optim_state_key), f"optimizer state '{optim_state_key}'")


def safe_set_full_optimizer_state(param: torch.nn.Parameter, value: torch.Tensor, optim_state_key: str) -> None:
    """Overwrite ``param``'s optimizer state ``optim_state_key`` with the full ``value`` (the same on every rank)."""
    strategy = _strategy(param)
    if strategy is not None:
        _scatter(param, strategy, _state_picker(optim_state_key), value, f"optimizer state '{optim_state_key}'")


def safe_get_full_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The full gradient of ``param``: reduced and averaged over data-parallel ranks, fp32, before clipping.

    Valid after ``engine.backward()`` of an accumulation boundary and before ``engine.step()`` (with fp16 it still
    carries the loss scale, as in DeepSpeed). A parameter no strategy manages returns its ``.grad``.
    Collective: call on every rank of the data-parallel group.
    """
    strategy = _strategy(param)
    if strategy is None:
        return param.grad
    _finish(strategy)
    full = _gather(param, strategy, _grad_picker, "the gradient")
    return full.div_(_grad_divisor(strategy))


def safe_set_full_grad(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite ``param``'s reduced gradient with the full, averaged ``value`` (the same on every rank).

    Use it between ``backward()`` and ``step()``; the optimizer then steps on ``value`` (clipping still applies).
    """
    strategy = _strategy(param)
    if strategy is None:
        if param.grad is not None:
            param.grad.copy_(value)
        return
    _finish(strategy)
    _scatter(param, strategy, _grad_picker, value, "safe_set_full_grad", scale=float(_grad_divisor(strategy)))


def safe_update_full_grad_vectorized(param_list: list[torch.nn.Parameter],
                                     update_func: Callable[[torch.Tensor, torch.nn.Parameter], torch.Tensor]) -> None:
    """For each parameter, replace its full gradient ``g`` by ``update_func(g, param)``. Collective."""
    for p in param_list:
        if not p.requires_grad:
            continue
        old = safe_get_full_grad(p)
        if old is not None:
            safe_set_full_grad(p, update_func(old, p))


# -- this rank's pieces (no communication) ---------------------------------------------------------------------------
def safe_get_local_fp32_param(param: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's fragments of the fp32 master value (1-D copy; empty if none); None if unmanaged."""
    strategy = _strategy(param)
    if strategy is None:
        return None
    return _local(param, strategy, _fp32_picker, "the fp32 master value")


def safe_set_local_fp32_param(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite this rank's fragments of the fp32 master value (``value`` sized like ``safe_get_local_fp32_param``)."""
    strategy = _strategy(param)
    if strategy is not None:
        _set_local(param, strategy, _fp32_picker, value, "safe_set_local_fp32_param")


def safe_get_local_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's fragments of the reduced, averaged gradient (1-D fp32 copy); None if unmanaged."""
    strategy = _strategy(param)
    if strategy is None:
        return None
    _finish(strategy)
    return _local(param, strategy, _grad_picker, "the gradient", scale=1.0 / _grad_divisor(strategy))


def safe_set_local_grad(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite this rank's fragments of the averaged gradient."""
    strategy = _strategy(param)
    if strategy is not None:
        _finish(strategy)
        _set_local(param, strategy, _grad_picker, value, "safe_set_local_grad", scale=float(_grad_divisor(strategy)))


def safe_get_local_optimizer_state(param: torch.nn.Parameter, optim_state_key: str) -> torch.Tensor | None:
    """This rank's fragments of optimizer state ``optim_state_key`` (1-D fp32 copy); None if unmanaged."""
    strategy = _strategy(param)
    if strategy is None:
        return None
    return _local(param, strategy, _state_picker(optim_state_key), f"optimizer state '{optim_state_key}'")


def safe_set_local_optimizer_state(param: torch.nn.Parameter, value: torch.Tensor, optim_state_key: str) -> None:
    """Overwrite this rank's fragments of optimizer state ``optim_state_key``."""
    strategy = _strategy(param)
    if strategy is not None:
        _set_local(param, strategy, _state_picker(optim_state_key), value, f"optimizer state '{optim_state_key}'")
