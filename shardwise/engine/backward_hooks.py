"""Plain ``loss.backward()`` on an engine's outputs: the same training as ``engine.backward(loss)``.

DeepSpeed 0.18.3+ lets a training loop call ``tensor.backward(...)`` directly (its core-API update): hooks do what
``engine.backward`` did. shardwise does the same with one autograd node per forward call: ``Engine.forward`` routes
the floating-point outputs that require grad through ``_BackwardEntry``. Every backward pass that reaches the
model's parameters goes through such a node first (the outputs are computed from the parameters, and the loss from
the outputs), so its backward is the pass's prologue:

- when ``engine.backward`` is running (it scaled the loss and armed the strategy itself) the node is an identity;
- otherwise, on the first node of the pass, it arms the strategy for this micro-step exactly as ``engine.backward``
  does (``begin_backward(boundary)``: the accumulation boundary decides whether ZeRO reduces now) and queues the
  epilogue (``end_backward``: launch the reductions backward did not trigger) to run when autograd finishes the
  pass; then it multiplies the outputs' gradients by ``1 / gradient_accumulation_steps``, which is the loss
  division ``engine.backward`` does (gradients are linear in the output gradients).

fp16 loss scaling cannot move into a hook: the gradient of the fp16 outputs is computed *before* the node sees it,
so small values would already have underflowed. As in DeepSpeed, such a loop calls ``engine.scale(loss).backward()``
(the loss multiplied by the current loss scale); a plain ``loss.backward()`` with a loss scale other than 1 raises
``BackwardScaleError`` naming both fixes instead of training differently.

Gradients that arrive outside any pass the engine knows about (a loss built from ``engine.module(...)`` called
directly, bypassing the engine's forward) would be accumulated but never reduced; the strategies' gradient hooks
raise ``BackwardOutsideEngineError`` for them (``zero/hooks.py``).

What ``engine.backward`` does and the hooks cannot: record the loss for the step log and the non-finite-loss
monitor (the hooks never see the loss), and ``retain_graph``/``scale_wrt_gas`` arguments (pass ``retain_graph`` to
``loss.backward`` itself).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.utils._pytree as pytree


class BackwardScaleError(RuntimeError):
    """A plain ``loss.backward()`` under fp16 loss scaling (the loss must be scaled before backward)."""


class _Strategy(Protocol):
    def begin_backward(self, boundary: bool) -> None: ...

    def end_backward(self) -> None: ...


class _Scaler(Protocol):
    scale: float


class HookedEngine(Protocol):
    """What the hooks read from the engine."""

    strategy: _Strategy | None
    scaler: _Scaler
    _in_no_sync: bool

    def gradient_accumulation_steps(self) -> int: ...

    def is_gradient_accumulation_boundary(self) -> bool: ...


class BackwardHooks:
    """The per-engine state of hook-driven backward passes."""

    def __init__(self, engine: HookedEngine) -> None:
        self.engine = engine
        self.engine_backward = False  # engine.backward() is running: the node is an identity
        self.hooked_pass = False  # a plain backward pass is armed (its epilogue is queued)
        self.prescaled = False  # engine.scale(loss) was called: the next plain pass's loss carries the loss scale

    # -- forward side -----------------------------------------------------------------------------------------------
    def wrap_outputs(self, output: Any) -> Any:
        """Route the outputs that require grad through one ``_BackwardEntry`` (nested structures kept)."""
        if self.engine.strategy is None or not torch.is_grad_enabled():
            return output
        # a forward runs between backward passes: a pass whose epilogue never ran (backward raised) is over
        self.hooked_pass = False
        leaves, spec = pytree.tree_flatten(output)
        positions = [i for i, x in enumerate(leaves)
                     if torch.is_tensor(x) and x.requires_grad and x.is_floating_point()]
        if not positions:
            return output
        wrapped = _BackwardEntry.apply(self, *(leaves[i] for i in positions))
        if len(positions) == 1:
            wrapped = (wrapped,)
        for i, t in zip(positions, wrapped):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, spec)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the current loss scale, for ``engine.scale(loss).backward()`` (DeepSpeed's ``scale``)."""
        self.prescaled = True
        factor = self.engine.scaler.scale
        return loss * factor if factor != 1.0 else loss

    # -- backward side ----------------------------------------------------------------------------------------------
    def output_grad_factor(self) -> float:
        """Called by every entry node's backward: arm the pass if it is a plain one; the output-gradient factor."""
        if self.engine_backward:
            return 1.0
        if not self.hooked_pass:
            self._prologue()
        return 1.0 / self.engine.gradient_accumulation_steps()

    def _prologue(self) -> None:
        engine = self.engine
        if engine.scaler.scale != 1.0 and not self.prescaled:
            raise BackwardScaleError(
                f"loss.backward() under fp16 loss scaling (scale {engine.scaler.scale:g}): the gradients would be "
                "computed unscaled and underflow. Fix: call engine.backward(loss), or "
                "engine.scale(loss).backward() (DeepSpeed's manual-backward API)")
        self.prescaled = False
        self.hooked_pass = True
        engine.strategy.begin_backward(engine.is_gradient_accumulation_boundary() and not engine._in_no_sync)
        torch.autograd.Variable._execution_engine.queue_callback(self._epilogue)

    def _epilogue(self) -> None:
        self.hooked_pass = False
        self.engine.strategy.end_backward()


class _BackwardEntry(torch.autograd.Function):
    """Identity on the engine's outputs whose backward is a plain backward pass's prologue (see the module doc)."""

    @staticmethod
    def forward(ctx: Any, hooks: BackwardHooks, *tensors: torch.Tensor) -> Any:
        ctx.hooks = hooks
        out = tuple(t.detach() for t in tensors)  # new tensor objects: callers may modify them in place
        return out if len(out) > 1 else out[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        factor = ctx.hooks.output_grad_factor()
        if factor != 1.0:
            grads = tuple(g * factor if g is not None else None for g in grads)
        return (None, *grads)
