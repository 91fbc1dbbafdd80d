"""Random-number-generator state of one rank: capture for a checkpoint, restore on load.

Saved per rank: torch's CPU generator, the accelerator's generator (``get_accelerator().get_rng_state()``; on the CPU
accelerator that is the same CPU generator), Python's ``random`` and numpy's global generator. Tensors go into the
rank's safetensors shard; the few scalars into the manifest. When tensor parallelism is in use, the named streams of
the model-parallel RNG tracker (``shardwise.tp.random``) are saved too. Restoring them makes dropout after a resume
draw the same masks as an uninterrupted run.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from shardwise.accelerator import get_accelerator

PREFIX = "rng."


def capture() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This rank's generator states: (tensors for the shard, JSON scalars for the manifest)."""
    tensors = {f"{PREFIX}torch": torch.get_rng_state().clone()}
    meta: dict[str, Any] = {}
    acc = get_accelerator()
    if acc.device().type != "cpu":
        tensors[f"{PREFIX}accelerator"] = acc.get_rng_state().cpu().clone()
    version, internal, gauss = random.getstate()
    tensors[f"{PREFIX}python"] = torch.tensor(internal, dtype=torch.int64)
    meta["python"] = {"version": version, "gauss_next": gauss}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors[f"{PREFIX}numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta["numpy"] = {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    tracker = _tracker()
    if tracker is not None:
        streams = tracker.get_states()
        meta["tracker"] = sorted(streams)
        for stream, state in streams.items():
            tensors[f"{PREFIX}tracker.{stream}"] = state.cpu().clone()
    return tensors, meta


def _tracker() -> Any:
    """The tensor-parallel RNG tracker, if tensor parallelism was imported (never imported from here)."""
    module = sys.modules.get("shardwise.tp.random")
    return module.get_cuda_rng_tracker() if module is not None else None


def restore(fetch: Callable[[str], torch.Tensor], meta: dict[str, Any], has: Callable[[str], bool]) -> None:
    """Put back the states saved by :func:`capture` (``fetch(key)`` reads one of its tensors)."""
    torch.set_rng_state(fetch(f"{PREFIX}torch").to(torch.uint8))
    acc = get_accelerator()
    if acc.device().type != "cpu" and has(f"{PREFIX}accelerator"):
        acc.set_rng_state(fetch(f"{PREFIX}accelerator").to(torch.uint8))
    py = meta["python"]
    random.setstate((py["version"], tuple(int(x) for x in fetch(f"{PREFIX}python").tolist()), py["gauss_next"]))
    npm = meta["numpy"]
    keys = fetch(f"{PREFIX}numpy").numpy().astype(np.uint32)
    np.random.set_state((npm["name"], keys, npm["pos"], npm["has_gauss"], npm["cached_gaussian"]))
    tracker = _tracker()
    if tracker is not None and meta.get("tracker"):
        tracker.set_states({s: fetch(f"{PREFIX}tracker.{s}").to(torch.uint8) for s in meta["tracker"]})
