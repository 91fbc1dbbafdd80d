"""Random layerwise token dropping (random-LTD, DeepSpeed's ``data_routing.random_ltd``; arXiv 2211.11586).

A layer wrapped in ``RandomLayerTokenDrop`` processes only a random, order-preserving subset of the sequence
positions during training: the kept tokens are gathered, run through the layer, and scattered back; the dropped
tokens skip the layer unchanged. How many tokens are kept grows from ``min_value`` to ``max_value`` with the step
(``RandomLTDScheduler``, fixed_linear); once it reaches the sequence length every layer sees every token.

Use as in DeepSpeed: ``convert_to_random_ltd(engine, LayerClass)`` wraps every ``LayerClass`` module and calls
``engine.random_ltd_initialize()``, which configures the wrappers whose layer number is listed in
``random_ltd_layer_id`` (a wrapper's layer number is the last integer in its module path, e.g. 3 for ``h.3``; its
position among the wrappers when the path has none). The engine steps the schedule before every training forward.

The first configured layer draws the kept positions for every configured layer of the step (one draw per layer and
sample, from torch's default generator on the hidden states' device), so masks and indices are shared consistently.
Gather and scatter are plain ``torch.gather`` / ``torch.scatter`` (no custom kernel): autograd gives the dropped
tokens the incoming gradient and the kept ones the gradient through the layer, as DeepSpeed's fused kernels do.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any

import torch
from torch import nn


class RandomLTDScheduler:
    """Tokens kept per random-LTD layer, by step, and the layer-tokens consumed so far (DeepSpeed's keys)."""

    def __init__(self, config: Any, global_batch_size: int) -> None:
        sched = config.random_ltd_schedule
        self.model_layer_num = config.total_layer_num
        self.random_ltd_layer_num = config.random_ltd_layer_num
        self.global_batch_size = global_batch_size
        self._initial = {"min_value": sched.min_value, "max_value": sched.max_value,
                         "current_value": sched.min_value, "schedule_type": sched.schedule_type,
                         "schedule_config": {"require_steps": sched.schedule_config.require_steps,
                                             "seq_per_step": sched.schedule_config.seq_per_step}}
        self.state: dict[str, Any] = {}
        self.reset_to_init()

    def reset_to_init(self) -> None:
        """Back to the first step."""
        self.state = {**self._initial, "schedule_config": dict(self._initial["schedule_config"]),
                      "consumed_layer_tokens": 0, "current_steps": -1}

    def get_value(self, global_steps: int) -> int:
        """The fixed_linear schedule at ``global_steps``: a multiple of ``seq_per_step``, at most ``max_value``."""
        sc, lo, hi = self.state["schedule_config"], self.state["min_value"], self.state["max_value"]
        value = math.floor(float(global_steps) / sc["require_steps"] * (hi - lo) + lo)
        value -= value % sc["seq_per_step"]
        return min(value, hi)

    def update_seq(self, global_steps: int) -> None:
        """Advance to ``global_steps`` (called by the engine before each training forward)."""
        if self.state["current_value"] < self.state["max_value"]:
            self.state["current_value"] = self.get_value(global_steps)
        if global_steps != self.state["current_steps"]:
            dropped = self.state["current_value"] * self.random_ltd_layer_num
            full = self.state["max_value"] * (self.model_layer_num - self.random_ltd_layer_num)
            self.state["consumed_layer_tokens"] += self.global_batch_size * (dropped + full)
            self.state["current_steps"] = global_steps

    def get_total_layer_tokens(self, train_iters: int) -> int:
        """Layer-tokens a run of ``train_iters`` steps consumes (advances this scheduler)."""
        for step in range(train_iters):
            self.update_seq(step)
        return self.state["consumed_layer_tokens"]

    def get_current_seq(self) -> int:
        """Tokens the random-LTD layers keep now."""
        return self.state["current_value"]

    def set_current_seq(self, seq_length: int) -> None:
        """Force the kept-token count."""
        self.state["current_value"] = seq_length

    def get_random_ltd_layer_num(self) -> int:
        """Number of layers that drop tokens."""
        return self.random_ltd_layer_num

    def get_state(self) -> dict[str, Any]:
        """The live state dict."""
        return self.state

    def set_state(self, state: dict[str, Any]) -> None:
        """Replace the state."""
        self.state = state

    _SAVED = ("consumed_layer_tokens", "current_steps", "current_value", "min_value", "max_value")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (DeepSpeed's keys)."""
        return {k: self.state[k] for k in self._SAVED}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from ``state_dict``."""
        for k in self._SAVED:
            self.state[k] = state_dict[k]


def sample_tokens(reserved: int, seq_len: int, batch: int, layers: int, device: torch.device) -> torch.Tensor:
    """Sorted random positions ``[layers, batch, reserved]`` (int64): each row a subset of ``range(seq_len)``."""
    weights = torch.ones(layers * batch, seq_len, device=device)
    picked = torch.multinomial(weights, reserved)
    return picked.sort(dim=-1).values.reshape(layers, batch, reserved)


def encoder_masks(mask: torch.Tensor, indices: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the ``[batch, heads, S, S]`` mask restricted to the kept rows and columns."""
    out = []
    b, h, _, s = mask.shape
    for idx in indices:
        r = idx.size(-1)
        rows = mask.gather(2, idx[:, None, :, None].expand(b, h, r, s))
        out.append(rows.gather(3, idx[:, None, None, :].expand(b, h, r, r)))
    return out


class RandomLayerTokenDrop(nn.Module):
    """Wraps a layer so that, in training, it sees only the tokens the random-LTD schedule keeps."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.random_ltd_layer = layer
        self.random_ltd_scheduler: RandomLTDScheduler | None = None
        self.random_ltd_layer_id = -1
        self.reserved_length = -1
        self.batch_first = True

    def init_config(self, config: Any, scheduler: RandomLTDScheduler, random_ltd_layer_id: int) -> None:
        """Attach the schedule; ``random_ltd_layer_id`` is this layer's index among the configured ones."""
        self.random_ltd_scheduler = scheduler
        self.random_ltd_layer_id = random_ltd_layer_id
        self.mask_name = config.model_mask_name
        self.model_type = config.model_type
        self.batch_first = config.hidden_state_order == "batch_seq_dim"
        self.random_ltd_num_layer = scheduler.random_ltd_layer_num

    def _draw(self, hidden: torch.Tensor, seq_len: int, batch: int, mask: torch.Tensor | None) -> None:
        state = self.random_ltd_scheduler.state
        indices = sample_tokens(self.reserved_length, seq_len, batch, self.random_ltd_num_layer, hidden.device)
        state["sample_idx"] = indices
        if mask is None:
            state["attention_mask"] = None
        elif self.model_type == "encoder":
            state["attention_mask"] = encoder_masks(mask, indices)
        else:  # causal: the kept tokens keep their order, so the leading block of the mask is theirs
            state["attention_mask"] = mask[..., :self.reserved_length, :self.reserved_length]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sched = self.random_ltd_scheduler
        seq_dim = 1 if self.batch_first else 0
        if sched is None or not self.training:
            return self.random_ltd_layer(hidden_states, *args, **kwargs)
        self.reserved_length = sched.get_current_seq()
        seq_len, batch = hidden_states.size(seq_dim), hidden_states.size(1 - seq_dim)
        if self.reserved_length >= seq_len:
            return self.random_ltd_layer(hidden_states, *args, **kwargs)
        mask = kwargs.get(self.mask_name) if self.mask_name else None
        if self.random_ltd_layer_id == 0 or "sample_idx" not in sched.state:
            self._draw(hidden_states, seq_len, batch, mask)
        idx = sched.state["sample_idx"][self.random_ltd_layer_id]  # [batch, reserved]
        if self.mask_name and self.mask_name in kwargs:
            masks = sched.state["attention_mask"]
            kwargs[self.mask_name] = masks[self.random_ltd_layer_id] if self.model_type == "encoder" else masks
        index = idx if self.batch_first else idx.t()
        index = index.unsqueeze(-1).expand(*index.shape, hidden_states.size(-1))
        part = hidden_states.gather(seq_dim, index)
        outputs = self.random_ltd_layer(part, *args, **kwargs)
        first = outputs[0] if isinstance(outputs, tuple) else outputs
        if not torch.is_tensor(first):
            raise TypeError(f"random-LTD wraps layers returning a tensor or a tuple starting with one; "
                            f"{type(self.random_ltd_layer).__name__} returned {type(outputs).__name__}")
        merged = hidden_states.scatter(seq_dim, index, first)
        return (merged, *outputs[1:]) if isinstance(outputs, tuple) else merged


def layer_number(name: str, position: int) -> int:
    """The last integer component of a module path (``h.3`` -> 3), else ``position``."""
    numbers = [int(part) for part in name.split(".") if re.fullmatch(r"\d+", part)]
    return numbers[-1] if numbers else position


def convert_to_random_ltd(model: Any, convert_type: type[nn.Module]) -> Any:
    """Wrap every ``convert_type`` module of ``model`` (an engine or a module) in ``RandomLayerTokenDrop``; on an
    engine, also configure the wrappers (``engine.random_ltd_initialize()``). Returns ``model``."""
    root = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    targets = [(name, m) for name, m in root.named_modules() if isinstance(m, convert_type) and name]
    if not targets:
        raise ValueError(f"convert_to_random_ltd: the model has no {convert_type.__name__} module to wrap")
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, RandomLayerTokenDrop(module))
    if hasattr(model, "random_ltd_initialize"):
        model.random_ltd_initialize()
    return model


def remove_random_ltd_state_dict(state_dict: dict[str, Any]) -> OrderedDict:
    """A state dict with the wrappers' ``.random_ltd_layer`` path component removed (loads into the plain model)."""
    return OrderedDict((k.replace(".random_ltd_layer", ""), v) for k, v in state_dict.items())


def save_without_random_ltd(model: Any) -> OrderedDict:
    """The model's state dict without random-LTD wrapper names."""
    root = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
    return remove_random_ltd_state_dict(root.state_dict())


__all__ = ["RandomLTDScheduler", "RandomLayerTokenDrop", "convert_to_random_ltd", "layer_number",
           "remove_random_ltd_state_dict", "sample_tokens", "save_without_random_ltd"]
