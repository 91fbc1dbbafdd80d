"""``FlopsProfiler`` and ``get_model_profile``: DeepSpeed's flops profiler API, built on ``torch.utils.flop_counter``.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, torch's own count of the matrix products,
convolutions and attention kernels an operation runs (2 FLOPs per multiply-add, so MACs = FLOPs / 2). Element-wise
work (activations, norms, softmax) is not counted: DeepSpeed adds rough estimates for those, which shifts its totals
by a few percent; torch's count is exact for what it covers. Per-module numbers come from forward pre/post hooks
on every module: the FLOP counter's running total and the wall clock (accelerator-synchronised) are read on entry
and exit, so a module's FLOPs and latency include its children's, as DeepSpeed reports them. Statistics live in
the profiler (``module_profile()``), not as attributes on the modules.

Inside the engine (``"flops_profiler": {"enabled": true, ...}``), rank 0 profiles every forward of optimizer step
``profile_step`` (counting from 0, as DeepSpeed; each forward restarts the count, so the report shows one
micro-batch) and prints the report when that step ends, with the step's measured forward/backward/optimizer times:
achieved FLOP/s = (3 + recompute_fwd_factor) x forward FLOPs x micro-batches / step time, and MFU against
``peak_tflops``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from shardwise.accelerator import get_accelerator
from shardwise.common.logging import logger
from shardwise.profiling.flops_profiler import report


@dataclass
class ModuleStats:
    """One module's profile: parameters (including children's) and, summed over its calls, FLOPs and seconds."""

    name: str
    type_name: str
    depth: int
    params: int
    children: list[str] = field(default_factory=list)
    flops: int = 0
    duration: float = 0.0
    calls: int = 0

    @property
    def macs(self) -> int:
        """Multiply-accumulates (every counted FLOP is half of one)."""
        return self.flops // 2


def _extra_formulas() -> dict[Any, Any]:
    """Kernels torch's counter has no formula for: the CPU flash attention counts as the other SDPA kernels."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    out = {}
    cpu_sdpa = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in flop_counter.flop_registry:
        out[cpu_sdpa] = _sdpa_flops
    return out


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    """torch's SDPA count (FlopCounterMode passes tensor shapes; causal masking is not discounted, as torch)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _numel(p: torch.Tensor) -> int:
    from shardwise.zero.sharded_param import ZeroParameter

    return p.ds_numel if isinstance(p, ZeroParameter) else p.numel()  # ZeRO-3: the full size, not the shard


class FlopsProfiler:
    """Profiles the forward passes of ``model`` between ``start_profile()`` and ``stop_profile()``.

    ``ds_engine`` (the engine, when profiling inside training) adds the parallel layout to the report;
    ``recompute_fwd_factor`` counts extra forwards from activation recomputation; ``peak_tflops`` (per device)
    adds the MFU line.
    """

    def __init__(self, model: nn.Module, ds_engine: Any = None, recompute_fwd_factor: float = 0.0,
                 peak_tflops: float | None = None) -> None:
        self.model = model
        self.ds_engine = ds_engine
        self.recompute_fwd_factor = recompute_fwd_factor
        self.peak_flops = peak_tflops * 1e12 if peak_tflops else None
        self.started = False
        self.func_patched = False  # DeepSpeed's flag: whether counting is active
        self._stats: dict[str, ModuleStats] = {}
        self._handles: list[Any] = []
        self._counter: FlopCounterMode | None = None
        self._open: list[tuple[ModuleStats, int, float]] = []
        self._times: report.StepTimes | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def start_profile(self, ignore_list: Sequence[type] | None = None, _hook_model: bool = True) -> None:
        """Reset the statistics and start counting forwards (module hooks plus torch's FLOP counter)."""
        self.stop_profile()
        self.reset_profile()
        ignored = tuple(ignore_list or ())
        for name, module in self.model.named_modules():
            if (ignored and isinstance(module, ignored)) or (not name and not _hook_model):
                continue
            stats = self._stats[name]
            self._handles.append(module.register_forward_pre_hook(self._enter_hook(stats)))
            self._handles.append(module.register_forward_hook(self._exit_hook(stats), always_call=True))
        self._counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
        self._counter.__enter__()
        self.started = self.func_patched = True

    def stop_profile(self) -> None:
        """Stop counting; the statistics stay readable until ``end_profile()``."""
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._open.clear()
        self.func_patched = False

    def reset_profile(self) -> None:
        """Zero every module's statistics (and read the parameter counts again)."""
        self._stats = {}
        for name, module in self.model.named_modules():
            depth = name.count(".") + 1 if name else 0
            children = [f"{name}.{c}" if name else c for c, _ in module.named_children()]
            params = sum(_numel(p) for p in module.parameters())
            self._stats[name] = ModuleStats(name, type(module).__name__, depth, params, children)
        self._times = None

    def end_profile(self) -> None:
        """Stop counting and drop the statistics."""
        if not self.started:
            return
        self.stop_profile()
        self.started = False
        self._stats = {}

    def begin_forward(self) -> None:
        """Start a profile from inside the model's own forward pre-hook (the engine's profile step): the model's
        hooks cannot be added to a call already in progress, so its entry is recorded here instead."""
        self.start_profile(_hook_model=False)
        self._enter_hook(self._stats[""])(self.model, ())

    def end_forward(self) -> None:
        """Close what ``begin_forward`` opened, from the model's forward hook, and stop counting."""
        if self.func_patched:
            self._exit_hook(self._stats[""])(self.model, (), None)
            self.stop_profile()

    @contextlib.contextmanager
    def profile(self, ignore_list: Sequence[type] | None = None) -> Iterator[FlopsProfiler]:
        """``with prof.profile(): model(x)`` = ``start_profile()`` ... ``stop_profile()``."""
        self.start_profile(ignore_list)
        try:
            yield self
        finally:
            self.stop_profile()

    # -- hooks --------------------------------------------------------------------------------------------------------
    def _flops_now(self) -> int:
        counter = self._counter
        return sum(counter.flop_counts["Global"].values()) if counter is not None else 0

    def _enter_hook(self, stats: ModuleStats) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            get_accelerator().synchronize()
            self._open.append((stats, self._flops_now(), time.perf_counter()))

        return hook

    def _exit_hook(self, stats: ModuleStats) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            get_accelerator().synchronize()
            while self._open:  # unwind to this module's entry (a child that raised leaves its entry behind)
                entry, flops0, t0 = self._open.pop()
                if entry is stats:
                    stats.flops += self._flops_now() - flops0
                    stats.duration += time.perf_counter() - t0
                    stats.calls += 1
                    return

        return hook

    # -- results ------------------------------------------------------------------------------------------------------
    def module_profile(self) -> dict[str, ModuleStats]:
        """Every module's statistics by qualified name (``""`` is the model itself)."""
        return dict(self._stats)

    def _root(self) -> ModuleStats:
        return self._stats.get("") or ModuleStats("", type(self.model).__name__, 0, 0)

    def get_total_flops(self, as_string: bool = False) -> int | str:
        """FLOPs of the profiled forward passes."""
        value = self._root().flops
        return report.number_to_string(value) if as_string else value

    def get_total_macs(self, as_string: bool = False) -> int | str:
        """Multiply-accumulates of the profiled forward passes."""
        value = self._root().macs
        return report.macs_to_string(value) if as_string else value

    def get_total_duration(self, as_string: bool = False) -> float | str:
        """Seconds spent in the model's forward while profiling."""
        value = self._root().duration
        return report.duration_to_string(value) if as_string else value

    def get_total_params(self, as_string: bool = False) -> int | str:
        """Parameters of the model on this rank (full sizes for ZeRO-3 partitioned parameters)."""
        value = self._root().params
        return report.params_to_string(value) if as_string else value

    def record_step(self, forward: float, backward: float, step: float, micro_batches: int) -> None:
        """The profiled optimizer step's times in seconds (the engine calls this before printing)."""
        self._times = report.StepTimes(forward, backward, step, micro_batches)

    def achieved_flops(self) -> float | None:
        """FLOP/s per device over the recorded step (None before ``record_step``)."""
        if self._times is None:
            return None
        return report.achieved_flops(self._root().flops, self._times, self.recompute_fwd_factor)

    # -- the report -----------------------------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        e = self.ds_engine
        if e is None:
            return {}
        return {"world_size": e.world_size, "dp_size": e.dp_world_size, "mp_size": e.mp_world_size,
                "micro_batch": e.train_micro_batch_size_per_gpu()}

    def _totals(self) -> dict[str, float]:
        root = self._root()
        return {"params": root.params, "macs": root.macs, "flops": root.flops, "duration": root.duration}

    def report_lines(self, profile_step: int = 1, module_depth: int = -1, top_modules: int = 1,
                     detailed: bool = True) -> list[str]:
        """The report as lines (what ``print_model_profile`` prints)."""
        totals = self._totals()
        lines = ["", "-------------------------- shardwise flops profiler --------------------------",
                 f"Profile summary at step {profile_step}:",
                 "FLOPs count matrix products, convolutions and attention (torch.utils.flop_counter; 2 per "
                 "multiply-add); element-wise work is not counted.", ""]
        lines += report.summary_lines(totals, self._layout(), self.recompute_fwd_factor, self._times, self.peak_flops)
        lines += ["", "----------------------------- Aggregated Profile per device -----------------------------"]
        lines += report.aggregated_lines(self._by_depth(), module_depth, top_modules)
        if detailed:
            lines += ["", "------------------------------ Detailed Profile per device ------------------------------",
                      "Each module: params, share of params, MACs, share of MACs, fwd latency, share of latency, "
                      "fwd FLOPS (children included)."]
            lines += self._tree_lines(module_depth, totals)
        lines.append("------------------------------------------------------------------------------")
        return [line.rstrip() for line in lines]

    def print_model_profile(self, profile_step: int = 1, module_depth: int = -1, top_modules: int = 1,
                            detailed: bool = True, output_file: str | None = None) -> None:
        """Print the report to stdout, or write it to ``output_file``."""
        if not self.started:
            return
        text = "\n".join(self.report_lines(profile_step, module_depth, top_modules, detailed)) + "\n"
        if output_file:
            import os

            os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
            with open(output_file, "w") as f:
                f.write(text)
            logger.info("flops profile written to %s", output_file)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def print_model_aggregated_profile(self, module_depth: int = -1, top_modules: int = 1) -> None:
        """Print only the top modules per depth."""
        print("\n".join(report.aggregated_lines(self._by_depth(), module_depth, top_modules)))

    def _by_depth(self) -> list[dict[str, tuple[float, float, float]]]:
        levels: list[dict[str, list[float]]] = []
        for s in self._stats.values():
            while len(levels) <= s.depth:
                levels.append({})
            row = levels[s.depth].setdefault(s.type_name, [0.0, 0.0, 0.0])
            row[0] += s.macs
            row[1] += s.params
            row[2] += s.duration
        return [{k: (v[0], v[1], v[2]) for k, v in level.items()} for level in levels] or [{}]

    def _tree_lines(self, module_depth: int, totals: dict[str, float]) -> list[str]:
        out: list[str] = []

        def walk(name: str) -> None:
            s = self._stats[name]
            if module_depth != -1 and s.depth > module_depth:
                return
            out.append(report.module_line(s.depth, name, s.type_name, (s.params, s.macs, s.duration), totals))
            for child in s.children:
                if child in self._stats:
                    walk(child)

        if "" in self._stats:
            walk("")
        return out


def get_model_profile(model: nn.Module, input_shape: tuple[int, ...] | None = None, args: Sequence[Any] = (),
                      kwargs: dict[str, Any] | None = None, print_profile: bool = True, detailed: bool = True,
                      module_depth: int = -1, top_modules: int = 1, warm_up: int = 1, as_string: bool = True,
                      output_file: str | None = None, ignore_modules: Sequence[type] | None = None,
                      mode: str = "forward") -> tuple[Any, Any, Any]:
    """Profile one forward (``mode="forward"``) or ``generate`` call of ``model`` after ``warm_up`` unprofiled ones;
    returns ``(flops, macs, params)``, as strings unless ``as_string=False``.

    Inputs: ``input_shape`` (one tensor of that shape, in the model's dtype and device), or ``args``/``kwargs``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_model_profile() needs an nn.Module, got {type(model).__name__}")
    if mode not in ("forward", "generate"):
        raise ValueError(f'get_model_profile(mode={mode!r}): use "forward" or "generate"')
    kwargs = dict(kwargs or {})
    if input_shape is not None:
        if not isinstance(input_shape, tuple) or not input_shape:
            raise ValueError(f"input_shape must be a non-empty tuple, got {input_shape!r}")
        first = next(model.parameters(), None)
        args = [torch.ones(input_shape, dtype=first.dtype if first is not None else torch.float32,
                           device=first.device if first is not None else "cpu")]
    if not args and not kwargs:
        raise ValueError("get_model_profile() needs inputs: input_shape=..., or args=[...] / kwargs={...}")
    call = model.generate if mode == "generate" else model
    model.eval()
    prof = FlopsProfiler(model)
    with torch.no_grad():
        for _ in range(warm_up):
            call(*args, **kwargs)
        with prof.profile(ignore_list=ignore_modules):
            call(*args, **kwargs)
    flops, macs, params = prof.get_total_flops(), prof.get_total_macs(), prof.get_total_params()
    if print_profile:
        prof.print_model_profile(profile_step=warm_up, module_depth=module_depth, top_modules=top_modules,
                                 detailed=detailed, output_file=output_file)
    prof.end_profile()
    if as_string:
        return report.number_to_string(flops), report.macs_to_string(macs), report.params_to_string(params)
    return flops, macs, params
