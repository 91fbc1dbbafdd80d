"""The engine's data-efficiency surface (DeepSpeed's ``DeepSpeedEngine`` methods of the same names), as a mixin.

The engine owns none of the logic: it calls ``_setup_data_efficiency()`` once and
``_data_efficiency_kwargs(kwargs)`` before each forward. In training mode that advances the legacy curriculum
(``curriculum_learning`` block: the forward gets ``curriculum_seqlen``, the difficulty at ``global_steps + 1``, as
DeepSpeed 0.19.6 did) and the random-LTD schedule (at ``global_steps``). The curriculum *sampler* lives in the
training data loader (``loader.py``), which ``initialize(training_data=...)`` builds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from shardwise.data.curriculum import CurriculumScheduler
from shardwise.data.loader import CurriculumDataLoader
from shardwise.data.random_ltd import RandomLayerTokenDrop, RandomLTDScheduler, layer_number


class DataEfficiencyMixin:
    """Curriculum learning and random-LTD methods of the engine (needs ``_config``, ``module``, ``global_steps``
    and ``training_dataloader`` on the class it is mixed into)."""

    _config: Any
    module: nn.Module
    global_steps: int
    training_dataloader: Any

    def _setup_data_efficiency(self) -> None:
        legacy = self._config.curriculum_learning
        ltd_on = self._config.data_efficiency.data_routing.random_ltd.enabled
        if hasattr(type(self), "train_batch") and ((legacy is not None and legacy.enabled) or ltd_on):
            raise ValueError("random-LTD and the legacy curriculum_learning block are driven by the engine's "
                             "forward(), which the pipeline engine's train_batch() does not call; they are not "
                             "supported with PipelineModule. Fix: use data_efficiency.data_sampling."
                             "curriculum_learning (the data loader's curriculum) or train without the pipeline")
        self.curriculum_scheduler_legacy = CurriculumScheduler(legacy) if legacy is not None and legacy.enabled \
            else None
        ltd = self._config.data_efficiency.data_routing.random_ltd
        self.random_ltd_scheduler = RandomLTDScheduler(ltd, self._config.train_batch_size) if ltd.enabled else None
        if self.random_ltd_scheduler is not None and any(isinstance(m, RandomLayerTokenDrop)
                                                         for m in self.module.modules()):
            self.random_ltd_initialize()  # the model was converted before initialize()

    def _data_efficiency_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Advance the step-driven schedules before a training forward; add ``curriculum_seqlen`` if legacy."""
        if not self.module.training:
            return kwargs
        if self.curriculum_scheduler_legacy is not None:
            difficulty = self.curriculum_scheduler_legacy.update_difficulty(self.global_steps + 1)
            if self._config.curriculum_learning.curriculum_type == "seqlen":
                kwargs = {**kwargs, "curriculum_seqlen": difficulty}
        if self.random_ltd_scheduler is not None:
            self.random_ltd_scheduler.update_seq(self.global_steps)
        return kwargs

    def _curriculum_loader(self) -> CurriculumDataLoader | None:
        loader = self.training_dataloader
        loader = getattr(loader, "loader", loader)  # unwrap a RepeatingLoader (the pipeline engine's)
        return loader if isinstance(loader, CurriculumDataLoader) else None

    # -- DeepSpeed's accessors ------------------------------------------------------------------------------------
    def curriculum_enabled_legacy(self) -> bool:
        """Whether the legacy top-level ``curriculum_learning`` block is on."""
        return self.curriculum_scheduler_legacy is not None

    def curriculum_params_legacy(self) -> dict[str, Any]:
        """The legacy block's settings (without ``enabled``)."""
        legacy = self._config.curriculum_learning
        return {} if legacy is None else legacy.model_dump(exclude={"enabled"})

    def data_efficiency_enabled(self) -> bool:
        """The ``data_efficiency.enabled`` switch (informational: the inner switches decide, as in DeepSpeed)."""
        return self._config.data_efficiency.enabled

    def data_efficiency_config(self) -> dict[str, Any]:
        """The resolved ``data_efficiency`` block."""
        return self._config.data_efficiency.model_dump()

    def data_sampling_enabled(self) -> bool:
        """The ``data_sampling.enabled`` switch."""
        return self._config.data_efficiency.data_sampling.enabled

    def data_sampling_config(self) -> dict[str, Any]:
        """The resolved ``data_sampling`` block."""
        return self._config.data_efficiency.data_sampling.model_dump()

    def curriculum_learning_enabled(self) -> bool:
        """Whether curriculum data sampling is on."""
        return self._config.data_efficiency.data_sampling.curriculum_learning.enabled

    def curriculum_learning_config(self) -> dict[str, Any]:
        """The resolved ``curriculum_learning`` block of ``data_sampling``."""
        return self._config.data_efficiency.data_sampling.curriculum_learning.model_dump()

    def random_ltd_enabled(self) -> bool:
        """Whether random-LTD is on."""
        return self.random_ltd_scheduler is not None

    def random_ltd_config(self) -> dict[str, Any]:
        """The resolved ``random_ltd`` block."""
        return self._config.data_efficiency.data_routing.random_ltd.model_dump()

    def random_ltd_initialize(self) -> None:
        """Configure the model's ``RandomLayerTokenDrop`` wrappers whose layer number is in ``random_ltd_layer_id``
        (``convert_to_random_ltd`` calls this)."""
        if self.random_ltd_scheduler is None:
            raise RuntimeError("random_ltd_initialize(): random-LTD is off; set data_efficiency.data_routing."
                               "random_ltd.enabled to true")
        cfg = self._config.data_efficiency.data_routing.random_ltd
        wrappers = [(n, m) for n, m in self.module.named_modules() if isinstance(m, RandomLayerTokenDrop)]
        wanted = set(cfg.random_ltd_layer_id)
        chosen = [m for pos, (n, m) in enumerate(wrappers) if layer_number(n, pos) in wanted]
        if len(chosen) != cfg.random_ltd_layer_num:
            found = [layer_number(n, pos) for pos, (n, _) in enumerate(wrappers)]
            raise ValueError(f"data_efficiency.data_routing.random_ltd: random_ltd_layer_num is "
                             f"{cfg.random_ltd_layer_num} but {len(chosen)} converted layer(s) match "
                             f"random_ltd_layer_id {sorted(wanted)} (converted layer numbers: {found}). Fix: convert "
                             "the layers with convert_to_random_ltd(engine, LayerClass) and list their numbers")
        for index, wrapper in enumerate(chosen):
            wrapper.init_config(cfg, self.random_ltd_scheduler, index)

    def set_data_post_process_func(self, post_process_func: Callable[[Any, dict], Any]) -> None:
        """``fn(batch, sampler_state) -> batch`` applied by the curriculum loader to every batch."""
        loader = self._curriculum_loader()
        if loader is not None:
            loader.post_process_func = post_process_func

    def set_custom_curriculum_learning_schedule(self, schedule_func_dict: dict[str, Callable[[int], Any]]) -> None:
        """``{metric: step -> difficulty}`` for metrics with ``schedule_type: "custom"``."""
        loader = self._curriculum_loader()
        if loader is not None:
            loader.data_sampler.set_custom_curriculum_learning_schedule(schedule_func_dict)

    # -- checkpoints --------------------------------------------------------------------------------------------------
    def data_efficiency_state_dict(self) -> dict[str, Any]:
        """Curriculum sampler, legacy curriculum and random-LTD states (saved with every checkpoint)."""
        state: dict[str, Any] = {}
        loader = self._curriculum_loader()
        if loader is not None:
            state["data_sampler"] = loader.data_sampler.state_dict()
        if self.curriculum_scheduler_legacy is not None:
            state["curriculum_scheduler_legacy"] = dict(self.curriculum_scheduler_legacy.get_state())
        if self.random_ltd_scheduler is not None:
            state["random_ltd"] = self.random_ltd_scheduler.state_dict()
        return state

    def load_data_efficiency_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``data_efficiency_state_dict`` saved (parts this engine does not use are ignored)."""
        loader = self._curriculum_loader()
        if "data_sampler" in state and loader is not None:
            loader.data_sampler.load_state_dict(state["data_sampler"])
        if "curriculum_scheduler_legacy" in state and self.curriculum_scheduler_legacy is not None:
            self.curriculum_scheduler_legacy.set_state(dict(state["curriculum_scheduler_legacy"]))
        if "random_ltd" in state and self.random_ltd_scheduler is not None:
            self.random_ltd_scheduler.load_state_dict(state["random_ltd"])


__all__ = ["DataEfficiencyMixin"]
