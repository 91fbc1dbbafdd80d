"""The parts of ``DeepSpeedEngine``'s surface that Hugging Face Trainer and Accelerate call, over our engine.

Listed from transformers 5.x (``trainer.py``, ``integrations/deepspeed.py``) and accelerate 1.x
(``accelerator.py``, ``utils/deepspeed.py``): ``engine.config.get(...)`` (a dict-like config: ``ShardwiseConfig``
answers ``get``/``[]``), ``zero_gather_16bit_weights_on_model_save()``, ``_zero3_consolidated_16bit_state_dict()``
and ``_consolidated_16bit_state_dict()`` (``save_model``, ``get_state_dict``), ``optimizer.overflow``
(``step_was_skipped``) and ``compile(backend=, compile_kwargs=)``. ``deepspeed.tp_model_init`` (AutoTP through
Trainer) is ``shardwise.tp.autotp``'s. The rest of what they call (``backward``, ``step``,
``set_gradient_accumulation_boundary``, ``get_global_grad_norm``, ``save_checkpoint``/``load_checkpoint``,
``destroy``) is the engine's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class DeepSpeedSurfaceMixin:
    """Mixed into :class:`~shardwise.engine.Engine`."""

    module: nn.Module
    optimizer: Any
    _is_compiled: bool = False

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """Whether saving the model gathers ZeRO-3 weights (``stage3_gather_16bit_weights_on_model_save``)."""
        return bool(self.config.zero_optimization.stage3_gather_16bit_weights_on_model_save)

    def _consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
        """Full weights in the training dtype on rank 0, ``{}`` on the others; every rank must call it."""
        from shardwise.checkpoint.engine import consolidated_16bit_state_dict

        return consolidated_16bit_state_dict(self, exclude_frozen_parameters)

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
        """ZeRO-3's gathered full weights (rank 0; ``{}`` elsewhere). As DeepSpeed, it is an error to ask when the
        engine is not ZeRO-3."""
        if self.zero_optimization_stage() != 3:
            raise ValueError(f"_zero3_consolidated_16bit_state_dict needs ZeRO stage 3, this engine runs stage "
                             f"{self.zero_optimization_stage()}; call _consolidated_16bit_state_dict()")
        return self._consolidated_16bit_state_dict(exclude_frozen_parameters)

    def _record_overflow(self, overflow: bool) -> None:
        """Publish the last step's skip as ``engine.optimizer.overflow`` (accelerate's ``step_was_skipped``)."""
        if self.optimizer is not None:
            try:
                self.optimizer.overflow = bool(overflow)
            except AttributeError:  # an optimizer object that refuses new attributes: nothing to publish on
                pass

    @property
    def is_compiled(self) -> bool:
        """Whether :meth:`compile` has compiled the wrapped module."""
        return self._is_compiled

    def compile(self, backend: str | None = None, compile_kwargs: dict[str, Any] | None = None,
                schedule: Any = None, **_: Any) -> None:
        """Compile the wrapped module with ``torch.compile`` (DeepSpeed's ``engine.compile``): the engine keeps
        driving the step; only the module's forward/backward are compiled. ``schedule`` (DeepCompile) is refused."""
        if schedule is not None:
            raise NotImplementedError("engine.compile(schedule=...) is DeepSpeed's DeepCompile, which shardwise does "
                                      "not implement; call compile() without a schedule")
        if self.zero_optimization_stage() == 3:
            raise NotImplementedError("engine.compile() with ZeRO stage 3 is not supported by shardwise (its "
                                      "gather/release hooks run in Python around each module); use stage 0-2 or "
                                      "run without compiling (accelerate: no dynamo_backend / torch_compile)")
        if self._is_compiled:
            return
        kwargs = dict(compile_kwargs or {})
        if backend is not None:
            kwargs["backend"] = backend
        self.module.compile(**kwargs)
        self._is_compiled = True


__all__ = ["DeepSpeedSurfaceMixin"]
