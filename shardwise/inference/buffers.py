"""What a model built on the meta device still lacks once its weights are loaded, and where it gets it from.

A checkpoint holds parameters and persistent buffers. A model built on ``meta`` also holds tensors that no
checkpoint has: non-persistent buffers (rotary frequency tables, GPT-2's causal mask in older releases) and, in
older transformers releases, plain tensor attributes set in ``__init__`` (transformers 4.45's GPT-J keeps
``embed_positions`` and ``scale_attn`` that way, its LLaMA rotary module ``original_inv_freq``). Their values are
whatever the model's constructor computes, so they are taken from the constructor itself: a *skeleton* of the same
class is built from the model's config with every parameter on ``meta`` (no weight memory is touched) and every
other tensor real, and each tensor still on meta in the model is copied from the skeleton at the same module path,
in the dtype the model built it in. That needs no knowledge of which module computes what, so it holds for every
transformers release (transformers 5.x can recompute these tensors in ``_init_weights``, 4.x cannot).

A model without a Hugging Face config falls back to its own ``_init_weights``; with neither, a clear error.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from shardwise.inference import loader


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers is moved to ``meta`` at once; buffers and other tensors stay
    where they were computed. (Parameters are allocated, never written, before the move: no memory is touched.)
    It patches ``nn.Module.register_parameter`` for the process while inside: build nothing else meanwhile."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _skeleton(model: nn.Module) -> nn.Module | None:
    """A fresh instance of ``model``'s class from its config, parameters on meta, other tensors real on the CPU;
    None for a model that is not a Hugging Face ``PreTrainedModel``."""
    config, build = getattr(model, "config", None), getattr(type(model), "_from_config", None)
    if config is None or build is None:
        return None
    with torch.device("cpu"), parameters_on_meta():
        return build(copy.deepcopy(config))


def _meta_attributes(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module path, module, attribute)`` of every plain tensor attribute still on meta (not a buffer)."""
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if not name.startswith("_") and isinstance(value, torch.Tensor) and value.is_meta:
                yield path, module, name


def _from_skeleton(model: nn.Module, skeleton: nn.Module) -> None:
    for qualified, owner, name, is_buffer in list(loader.iter_meta(model)):
        if not is_buffer:
            continue
        path = qualified.rpartition(".")[0]
        real = skeleton.get_submodule(path)._buffers.get(name)
        if real is None or real.is_meta or tuple(real.shape) != tuple(owner._buffers[name].shape):
            raise loader.CheckpointError(f"buffer {qualified} is not in the checkpoint and the model's own "
                                         "constructor does not compute it; pass the model with its buffers "
                                         "materialised (build it with only parameters on meta)")
        owner._buffers[name] = real.to(owner._buffers[name].dtype)
    for path, owner, name in list(_meta_attributes(model)):
        real = getattr(skeleton.get_submodule(path), name, None)
        if isinstance(real, torch.Tensor) and not real.is_meta:
            setattr(owner, name, real.to(getattr(owner, name).dtype))


def _from_init_weights(model: nn.Module, device: torch.device) -> None:
    """Models without a Hugging Face config: their ``_init_weights`` computes the buffers (as transformers 5.x's
    does for rotary tables)."""
    owners: dict[int, nn.Module] = {}
    for _, owner, name, is_buffer in list(loader.iter_meta(model)):
        if is_buffer:
            owner._buffers[name] = torch.empty_like(owner._buffers[name], device=device)
            owners[id(owner)] = owner
    init = getattr(model, "_init_weights", None)
    for owner in owners.values():
        if init is None:
            raise loader.CheckpointError(f"buffers of {type(owner).__name__} are on the meta device and are not "
                                         "in the checkpoint; build the model with real buffers (only parameters "
                                         "on meta) or pass the model with its buffers materialised")
        with torch.no_grad():
            init(owner)


def finalize_buffers(model: nn.Module, device: torch.device) -> None:
    """Give every tensor the checkpoint did not cover its constructor's value, then move every non-persistent
    buffer to ``device`` in its own dtype, as ``from_pretrained(dtype=...)`` leaves them (fp32 rotary frequencies
    are more accurate than 16-bit ones). Raises ``CheckpointError`` naming what is still missing."""
    pending = any(is_buffer for *_, is_buffer in loader.iter_meta(model)) or any(True for _ in
                                                                                  _meta_attributes(model))
    if pending:
        skeleton: Any = _skeleton(model)
        if skeleton is not None:
            _from_skeleton(model, skeleton)
            del skeleton
        else:
            _from_init_weights(model, device)
    left = [name for name, *_ in loader.iter_meta(model)] + [f"{p}.{n}" if p else n for p, _, n in
                                                             _meta_attributes(model)]
    if left:
        raise loader.CheckpointError(f"{len(left)} tensors are still on the meta device after loading, e.g. "
                                     f"{left[:5]}; the checkpoint does not cover this model")
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buf = module._buffers.get(name)
            if buf is not None:
                module._buffers[name] = buf.to(device)
