"""Device-graph capture of the forward pass (``enable_cuda_graph``), through the accelerator interface only.

``GraphRunner(module)`` captures ``module(*args, **kwargs)`` once per input signature (shapes, dtypes, devices of
the tensor arguments and the values of plain scalars) and replays it afterwards: CUDA graphs on cuda, HPU graphs on
hpu, via ``get_accelerator().create_graph()`` / ``capture_to_graph()`` / ``replay_graph()``. As with every graph
API, a replay writes into the *same* output tensors each time: clone an output you keep across calls.

Capture runs ``warmup`` eager passes on a side stream first (allocator and lazy initialisation settle outside the
graph), then records one pass with static input buffers. A call whose arguments are not all tensors and plain
scalars (a Hugging Face KV-cache object, for instance: its shapes change every step) runs eagerly, so
``generate()`` works unchanged and the graphs serve fixed-shape forwards (scoring, prefill of a fixed length).

On the cpu accelerator there is nothing to capture: ``init_inference(enable_cuda_graph=True)`` is a clear error
(``build.py``), and ``GraphRunner`` refuses to start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shardwise.accelerator import get_accelerator

_SCALARS = (bool, int, float, str, type(None))


@dataclass
class _Captured:
    graph: Any
    args: list[Any]
    kwargs: dict[str, Any]
    output: Any


def _signature(args: tuple, kwargs: dict) -> tuple | None:
    """A hashable description of the call, or None when an argument cannot live in a static buffer."""
    items = [(i, v) for i, v in enumerate(args)] + sorted(kwargs.items())
    sig = []
    for key, value in items:
        if isinstance(value, torch.Tensor):
            sig.append((key, "T", tuple(value.shape), value.dtype, str(value.device)))
        elif isinstance(value, _SCALARS):
            sig.append((key, "S", value))
        else:
            return None
    return tuple(sig)


def _static(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


class GraphRunner:
    """Capture-once, replay-after wrapper of a module's forward (see the module docstring)."""

    def __init__(self, module: nn.Module, accelerator: Any = None, warmup: int = 3) -> None:
        self.accelerator = accelerator or get_accelerator()
        if not self.accelerator.supports_graph_capture():
            raise RuntimeError(f"graph capture is not available on the {self.accelerator.device_name()} "
                               "accelerator; run without enable_cuda_graph, or on a cuda/hpu device")
        self.module, self.warmup = module, warmup
        self._graphs: dict[tuple, _Captured] = {}
        self.captures = self.replays = self.eager_calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sig = _signature(args, kwargs)
        if sig is None:
            self.eager_calls += 1
            return self.module(*args, **kwargs)
        captured = self._graphs.get(sig)
        if captured is None:  # capture records without computing (CUDA): the replay below produces the output
            captured = self._graphs[sig] = self._capture(args, kwargs)
        for static, new in zip(captured.args, args):
            if isinstance(static, torch.Tensor):
                static.copy_(new)
        for name, new in kwargs.items():
            if isinstance(new, torch.Tensor):
                captured.kwargs[name].copy_(new)
        self.accelerator.replay_graph(captured.graph)
        self.replays += 1
        return captured.output

    @torch.no_grad()
    def _capture(self, args: tuple, kwargs: dict) -> _Captured:
        acc = self.accelerator
        s_args = [_static(a) for a in args]
        s_kwargs = {k: _static(v) for k, v in kwargs.items()}
        side = acc.Stream()
        side.wait_stream(acc.current_stream())
        with acc.stream(side):
            for _ in range(self.warmup):
                self.module(*s_args, **s_kwargs)
        acc.current_stream().wait_stream(side)
        graph = acc.create_graph()
        with acc.capture_to_graph(graph):
            output = self.module(*s_args, **s_kwargs)
        self.captures += 1
        return _Captured(graph, s_args, s_kwargs, output)
