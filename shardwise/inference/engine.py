"""``init_inference`` and ``InferenceEngine``: DeepSpeed's inference entry point over shardwise's auto-TP.

    engine = shardwise.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.bfloat16,
                                      checkpoint="path/to/hf_model_dir")
    out = engine.generate(input_ids, max_new_tokens=32)     # the model's own generate(), on split weights
    logits = engine(input_ids).logits                        # forward (replayed as a device graph if enabled)

The engine is a thin ``nn.Module`` around the split model (``engine.module``): every tensor-parallel rank runs the
same calls on the same inputs and gets the same outputs (logits are gathered, sampling RNG states are synced at
start-up). The work happens in ``build.py`` (order of steps), ``autotp.py`` (what is split), ``loader.py`` (per-rank
sliced reads) and ``graphs.py`` (graph capture). Importable as ``deepspeed.inference.engine.InferenceEngine``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from shardwise.accelerator import get_accelerator
from shardwise.inference.build import build_inference
from shardwise.inference.config import DeepSpeedInferenceConfig, load_inference_config
from shardwise.inference.graphs import GraphRunner


class InferenceEngine(nn.Module):
    """A model prepared for inference: split over ``mp_world_size`` ranks, in ``dtype``, on its device.

    Attributes: ``module`` (the split model), ``dtype``, ``mp_world_size``, ``mp_group`` (torch ProcessGroup or
    None), ``tp_group`` (shardwise ``Group``), ``topology``, ``plan`` (what auto-TP did), ``load_stats`` (bytes this
    rank read), ``device``. Attributes the engine lacks are looked up on ``module`` (``engine.config`` is the
    model's config), so the engine can stand in for the model, e.g. in a Hugging Face pipeline.
    """

    def __init__(self, model: Any, config: DeepSpeedInferenceConfig) -> None:
        super().__init__()
        built = build_inference(model, config)
        self.module = built.module
        self._config = config
        self.dtype = config.dtype
        self.device = built.device
        self.tp_group = built.group
        self.topology = built.topology
        self.mp_world_size = built.group.size
        self.mp_group = built.group.torch_group if built.group.size > 1 else None
        self.plan = built.plan
        self.load_stats = built.stats
        self._graph = GraphRunner(self.module) if config.enable_cuda_graph else None
        self.model_profile_enabled = False
        self._model_times: list[float] = []

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None or name.startswith("__"):
                raise
            return getattr(module, name)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """The model's forward (a graph replay when ``enable_cuda_graph`` and the call has static shapes)."""
        start = self._tick()
        out = self._graph(*inputs, **kwargs) if self._graph is not None else self.module(*inputs, **kwargs)
        self._tock(start)
        return out

    def generate(self, *inputs: Any, **kwargs: Any) -> Any:
        """The model's own ``generate`` (every rank passes the same inputs and gets the same tokens)."""
        if self._config.replace_with_kernel_inject:
            self._check_length(inputs, kwargs)
        with torch.no_grad():
            return self.module.generate(*inputs, **kwargs)

    def _check_length(self, inputs: tuple, kwargs: dict) -> None:
        ids = inputs[0] if inputs else kwargs.get("input_ids")
        prompt = ids.shape[-1] if isinstance(ids, torch.Tensor) else 0
        new = kwargs.get("max_new_tokens") or 0
        total = kwargs.get("max_length") or prompt + new
        if total > self._config.max_out_tokens:
            raise ValueError(f"prompt ({prompt}) + new tokens = {total} exceeds max_out_tokens="
                             f"{self._config.max_out_tokens}; pass a larger max_out_tokens to init_inference")

    # -- DeepSpeed's latency profiling API -------------------------------------------------------------------------
    def profile_model_time(self, use_cuda_events: bool = True) -> None:
        """Record the latency of each forward call (read with ``model_times()``)."""
        self.model_profile_enabled = True

    def model_times(self) -> list[float]:
        """Latencies (seconds) of the forward calls since the last read; clears the list."""
        times, self._model_times = self._model_times, []
        return times

    def _tick(self) -> float | None:
        if not self.model_profile_enabled:
            return None
        get_accelerator().synchronize()
        return time.perf_counter()

    def _tock(self, start: float | None) -> None:
        if start is not None:
            get_accelerator().synchronize()
            self._model_times.append(time.perf_counter() - start)


def init_inference(model: Any = None, config: str | dict | None = None, **kwargs: Any) -> InferenceEngine:
    """Prepare ``model`` for (tensor-parallel) inference, as ``deepspeed.init_inference`` does.

    ``model``: an ``nn.Module`` (with real weights, or built on the meta device with ``shardwise.OnDevice`` /
    ``torch.device("meta")`` and then loaded from ``checkpoint``), a transformers config, or None when
    ``checkpoint`` is a Hugging Face directory with its config.json. ``config``: a dict or JSON path of
    DeepSpeed inference keys; ``kwargs`` are the same keys and take precedence (the same key with different
    values in both is an error). Main keys: ``tensor_parallel={"tp_size": N}`` (or ``mp_size``), ``dtype``,
    ``checkpoint`` + ``base_dir``, ``injection_policy``, ``enable_cuda_graph``, ``replace_with_kernel_inject``,
    ``max_out_tokens``, ``args`` (its ``device``); see ``DeepSpeedInferenceConfig`` and docs/inference.md.
    Returns an ``InferenceEngine``.
    """
    return InferenceEngine(model, load_inference_config(config, kwargs))
