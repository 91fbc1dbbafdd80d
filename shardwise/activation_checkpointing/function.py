"""``checkpoint(function, *args)``: run ``function`` without keeping its activations, and run it again in the
backward to get them back.

Both variants call ``function`` itself a second time (a real forward of the same modules with the same
arguments), so module forward hooks fire during the recomputation: ZeRO-3 re-gathers its partitioned parameters
exactly as in the first forward. The generator states in effect when the forward started (torch's CPU generator,
the accelerator's, and every stream of the tensor-parallel RNG tracker) are restored around the recomputation, so
dropout draws the same masks and gradients are bitwise identical to running without checkpointing.

* ``checkpoint`` (DeepSpeed's default, "reentrant"): an autograd Function whose backward recomputes under
  ``enable_grad`` and calls ``torch.autograd.backward`` on the recomputed outputs. At least one input must
  require grad (as with ``torch.utils.checkpoint(use_reentrant=True)``).
* ``non_reentrant_checkpoint``: the forward runs with grad enabled under ``saved_tensors_hooks`` that keep only an
  index for each tensor autograd would save; the first unpack in the backward recomputes and returns the
  recomputed tensors. Works when no input requires grad, with ``torch.autograd.grad`` and with keyword arguments.

Saved inputs go through ``storage.Stash`` (partition over the tensor group / host / contiguous buffers).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from shardwise.accelerator import get_accelerator
from shardwise.activation_checkpointing import settings as cfg
from shardwise.activation_checkpointing.buffers import release_contiguous_buffers
from shardwise.activation_checkpointing.storage import Stash
from shardwise.common.logging import log_dist
from shardwise.tp.random import get_cuda_rng_tracker

# -- RNG states -------------------------------------------------------------------------------------------------


def _rng_snapshot() -> tuple:
    acc = get_accelerator()
    device_state = acc.get_rng_state() if acc.device_name() != "cpu" else None
    return torch.get_rng_state(), device_state, get_cuda_rng_tracker().get_states()


def _rng_restore(snapshot: tuple) -> None:
    cpu_state, device_state, tracker_states = snapshot
    torch.set_rng_state(cpu_state)
    if device_state is not None:
        get_accelerator().set_rng_state(device_state)
    get_cuda_rng_tracker().set_states(tracker_states)


# -- boundaries: synchronize and profile ---------------------------------------------------------------------------


class _Boundary:
    """Synchronises the accelerator at both ends and logs the elapsed time, as the settings ask."""

    def __init__(self, what: str, name: str) -> None:
        self.what, self.name, self.s = what, name, cfg.get_settings()

    def __enter__(self) -> _Boundary:
        if self.s.synchronize_checkpoint_boundary or self.s.profile:
            get_accelerator().synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.s.synchronize_checkpoint_boundary or self.s.profile:
            get_accelerator().synchronize()
        if self.s.profile and exc[0] is None:
            ms = (time.perf_counter() - self.start) * 1e3
            log_dist(f"activation checkpoint {self.name}: {self.what} {ms:.3f} ms", ranks=[0])


def _name(function: Callable) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


def _detached(inputs: list[Any], like: tuple) -> list[Any]:
    """Leaf copies of the restored inputs, requiring grad where the originals did."""
    out = []
    for x, orig in zip(inputs, like):
        if torch.is_tensor(x):
            x = x.detach()
            x.requires_grad_(bool(torch.is_tensor(orig) and orig.requires_grad))
        out.append(x)
    return out


def _with_kwargs(function: Callable, args: tuple, kwargs: dict) -> tuple[Callable, tuple]:
    """Fold keyword arguments into positional ones, so tensors passed by keyword are saved like the others."""
    if not kwargs:
        return function, args
    keys, npos = tuple(kwargs), len(args)

    def call(*all_args: Any) -> Any:
        return function(*all_args[:npos], **dict(zip(keys, all_args[npos:])))

    call.__qualname__ = _name(function)
    return call, args + tuple(kwargs.values())


# -- reentrant ----------------------------------------------------------------------------------------------------


class CheckpointFunction(torch.autograd.Function):
    """The reentrant checkpoint (see the module docstring). ``box`` returns the output structure to the caller."""

    @staticmethod
    def forward(ctx: Any, run_function: Callable, box: dict, *args: Any) -> Any:
        with _Boundary("forward", _name(run_function)):
            ctx.run_function = run_function
            ctx.stash = Stash(args, cfg.get_settings(), cfg.partition_group())
            ctx.rng = _rng_snapshot()
            ctx.requires = tuple(torch.is_tensor(a) and a.requires_grad for a in args)
            with torch.no_grad():
                outputs = run_function(*args)
        single = torch.is_tensor(outputs)
        items = (outputs,) if single else tuple(outputs)
        box["single"], box["items"] = single, items
        tensors = tuple(o for o in items if torch.is_tensor(o))
        ctx.mark_non_differentiable(*[t for t in tensors if not t.is_floating_point()])
        return tensors

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("checkpoint() (reentrant) does not support torch.autograd.grad(); call "
                               ".backward(), or use non_reentrant_checkpoint")
        with _Boundary("recompute+backward", _name(ctx.run_function)):
            if cfg.get_settings().contiguous_memory_optimization:
                release_contiguous_buffers()  # the next forward refills fresh buffers; live slices stay valid
            inputs = _detached(ctx.stash.restore(), tuple(torch.zeros(0, requires_grad=r) for r in ctx.requires))
            ctx.stash.release()
            current = _rng_snapshot()
            _rng_restore(ctx.rng)
            try:
                with torch.enable_grad():
                    outputs = ctx.run_function(*inputs)
            finally:
                _rng_restore(current)
            items = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
            tensors = [o for o in items if torch.is_tensor(o)]
            pairs = [(o, g) for o, g in zip(tensors, grads) if o.requires_grad and g is not None]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads_in = tuple(x.grad if torch.is_tensor(x) and x.requires_grad else None for x in inputs)
        return (None, None) + grads_in


_warned_no_grad_inputs = False


def checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """Checkpoint ``function(*args, **kwargs)`` (DeepSpeed's ``deepspeed.checkpointing.checkpoint``).

    Returns what ``function`` returns (a tensor, or a tuple whose tensors are connected to the graph). Honors
    ``configure()``: partitioned, host-resident or contiguous saved inputs, synchronisation, profiling.
    """
    global _warned_no_grad_inputs
    function, args = _with_kwargs(function, args, kwargs)
    if not torch.is_grad_enabled():
        return function(*args)
    if not _warned_no_grad_inputs and not any(torch.is_tensor(a) and a.requires_grad for a in args):
        _warned_no_grad_inputs = True
        warnings.warn("checkpoint(): no input requires grad, so the parameters inside the checkpointed function get "
                      "no gradient (reentrant checkpointing); use non_reentrant_checkpoint, or make an input require "
                      "grad", stacklevel=2)
    box: dict = {}
    tensors = iter(CheckpointFunction.apply(function, box, *args))
    if box["single"]:
        return next(tensors)
    return tuple(next(tensors) if torch.is_tensor(o) else o for o in box["items"])


# -- non-reentrant ------------------------------------------------------------------------------------------------


class _Recompute:
    """Holds one checkpoint's stash; recomputes on the first unpack and serves the saved tensors by index."""

    def __init__(self, function: Callable, args: tuple) -> None:
        self.function, self.name = function, _name(function)
        self.stash = Stash(args, cfg.get_settings(), cfg.partition_group())
        self.requires = tuple(torch.is_tensor(a) and a.requires_grad for a in args)
        self.rng = _rng_snapshot()
        self.count = 0
        self.saved: list[Any] | None = None

    def pack(self, t: torch.Tensor) -> int:
        self.count += 1
        return self.count - 1

    def unpack(self, index: int) -> torch.Tensor:
        if self.saved is None:
            self._recompute()
        t = self.saved[index]
        if t is None:
            raise RuntimeError("non_reentrant_checkpoint: a saved activation was used twice (retain_graph=True or a "
                               "second backward); checkpointed graphs support one backward")
        self.saved[index] = None
        return t

    def _recompute(self) -> None:
        with _Boundary("recompute", self.name):
            inputs = _detached(self.stash.restore(), tuple(torch.zeros(0, requires_grad=r) for r in self.requires))
            self.stash.release()
            saved: list[Any] = []

            def keep(t: torch.Tensor) -> int:
                saved.append(t.detach() if t.requires_grad else t)
                return len(saved) - 1

            def never(i: int) -> torch.Tensor:
                raise RuntimeError("the recomputed graph of a checkpoint is never differentiated")

            current = _rng_snapshot()
            _rng_restore(self.rng)
            try:
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, never):
                    self.function(*inputs)
            finally:
                _rng_restore(current)
        if len(saved) != self.count:
            raise RuntimeError(f"non_reentrant_checkpoint({self.name}): the recomputation saved {len(saved)} tensors "
                               f"but the forward saved {self.count}; the function must run the same operations "
                               "both times (no data-dependent control flow on values that change between them)")
        self.saved = saved


def non_reentrant_checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """Checkpoint ``function`` without a reentrant backward (see the module docstring); same options."""
    function, args = _with_kwargs(function, args, kwargs)
    if not torch.is_grad_enabled():
        return function(*args)
    holder = _Recompute(function, args)
    with _Boundary("forward", holder.name), torch.autograd.graph.saved_tensors_hooks(holder.pack, holder.unpack):
        return function(*args)


def detach_variable(inputs: tuple) -> tuple:
    """Detached copies of the tensors in ``inputs`` keeping ``requires_grad`` (DeepSpeed's helper)."""
    if not isinstance(inputs, tuple):
        raise RuntimeError(f"detach_variable takes a tuple, got {type(inputs).__name__}")
    return tuple(_detached(list(inputs), inputs))
