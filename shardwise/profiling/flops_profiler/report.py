"""Text of the flops profiler's report: number formatting (DeepSpeed's helper names) and the three sections
(summary, top modules per depth, per-module tree). Pure formatting: takes numbers, returns lines."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_PRECISION = 2
_UNITS = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1.0), ("m", 1e-3), ("u", 1e-6))
LINE = "{:<78}  {:<8}"


def number_to_string(num: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """``num`` scaled to T/G/M/K/(none)/m/u, e.g. ``"1.5 G"``; ``units`` forces one scale."""
    if units is None:
        units, magnitude = next(((u, m) for u, m in _UNITS if abs(num) >= m), ("u", 1e-6))
        if num == 0:
            units, magnitude = "", 1.0
    else:
        magnitude = dict(_UNITS).get(units, 1.0)
    return f"{round(num / magnitude, precision):g} {units}"


def macs_to_string(macs: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """Multiply-accumulates, e.g. ``"3 GMACs"``."""
    return f"{number_to_string(macs, units, precision)}MACs"


def flops_to_string(flops: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """Floating-point operations (or per second), e.g. ``"6 GFLOPS"``."""
    return f"{number_to_string(flops, units, precision)}FLOPS"


def params_to_string(params: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """A parameter count, with B for billions, e.g. ``"1.3 B"``."""
    units = units.replace("B", "G") if units else units
    return number_to_string(params, units, precision).replace("G", "B").strip()


def duration_to_string(seconds: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """Seconds, e.g. ``"12.5 ms"``."""
    return f"{number_to_string(seconds, units, precision)}s"


@dataclass(frozen=True)
class StepTimes:
    """Wall-clock times of one optimizer step (seconds) and its number of micro-batches."""

    forward: float
    backward: float
    step: float
    micro_batches: int


def summary_lines(totals: dict[str, float], layout: dict[str, Any], recompute_fwd_factor: float,
                  times: StepTimes | None, peak_flops: float | None) -> list[str]:
    """The summary section. ``totals``: params, macs, flops, duration (one forward of one micro-batch);
    ``layout``: world/dp/mp sizes and micro-batch (empty outside the engine)."""
    mp = layout.get("mp_size", 1)
    flops, fwd = totals["flops"], totals["duration"]
    out = []
    for key, label in (("world_size", "world size: "), ("dp_size", "data parallel size: "),
                       ("mp_size", "model parallel size: "), ("micro_batch", "batch size per device: ")):
        if key in layout:
            out.append(LINE.format(label, layout[key]))
    out += [LINE.format("params per device: ", params_to_string(totals["params"])),
            LINE.format("params of model = params per device * mp_size: ", params_to_string(totals["params"] * mp)),
            LINE.format("fwd MACs per device: ", macs_to_string(totals["macs"])),
            LINE.format("fwd flops per device: ", number_to_string(flops)),
            LINE.format("fwd flops of model = fwd flops per device * mp_size: ", number_to_string(flops * mp))]
    if times is not None and times.micro_batches:
        fwd = times.forward / times.micro_batches
    out += [LINE.format("fwd latency: ", duration_to_string(fwd)),
            LINE.format("fwd FLOPS per device = fwd flops per device / fwd latency: ",
                        flops_to_string(flops / fwd if fwd else 0.0))]
    if times is None:
        return out
    out += _step_lines(flops, times, 2.0 + recompute_fwd_factor, peak_flops, layout)
    return out


def achieved_flops(fwd_flops: float, times: StepTimes, recompute_fwd_factor: float = 0.0) -> float:
    """FLOP/s per device over the whole step: (3 + recompute factor) x forward FLOPs x micro-batches / step time."""
    seconds = times.forward + times.backward + times.step
    total = (3.0 + recompute_fwd_factor) * fwd_flops * max(times.micro_batches, 1)
    return total / seconds if seconds > 0 else 0.0


def _step_lines(flops: float, times: StepTimes, bwd_factor: float, peak_flops: float | None,
                layout: dict[str, Any]) -> list[str]:
    n = max(times.micro_batches, 1)
    fwd, bwd = times.forward / n, times.backward / n
    iteration = times.forward + times.backward + times.step
    achieved = achieved_flops(flops, times, bwd_factor - 2.0)
    out = [LINE.format("bwd latency: ", duration_to_string(bwd)),
           LINE.format(f"bwd FLOPS per device = {bwd_factor:g} * fwd flops per device / bwd latency: ",
                       flops_to_string(bwd_factor * flops / bwd if bwd else 0.0)),
           LINE.format(f"fwd+bwd FLOPS per device = {bwd_factor + 1:g} * fwd flops per device / (fwd+bwd latency): ",
                       flops_to_string((bwd_factor + 1) * flops / (fwd + bwd) if fwd + bwd else 0.0)),
           LINE.format("step latency: ", duration_to_string(times.step)),
           LINE.format(f"iter latency ({n} micro-batch{'es' if n > 1 else ''}): ", duration_to_string(iteration)),
           LINE.format(f"FLOPS per device = {bwd_factor + 1:g} * fwd flops per device * {n} / iter latency: ",
                       flops_to_string(achieved))]
    if peak_flops:
        out.append(LINE.format(f"MFU = FLOPS per device / peak {flops_to_string(peak_flops)}: ",
                               f"{100 * achieved / peak_flops:.2f}%"))
    else:
        out.append(LINE.format("MFU: ", "set flops_profiler.peak_tflops (the device's peak) to report it"))
    if "micro_batch" in layout and iteration > 0:
        samples = layout["micro_batch"] * layout.get("dp_size", 1) * n
        out.append(LINE.format("samples/second: ", round(samples / iteration, DEFAULT_PRECISION)))
    return out


def aggregated_lines(by_depth: Sequence[dict[str, tuple[float, float, float]]], module_depth: int,
                     top_modules: int) -> list[str]:
    """Top ``top_modules`` module types per depth by params, MACs and latency. ``by_depth[d]``:
    ``{type name: (macs, params, seconds)}``."""
    depth = len(by_depth) - 1 if module_depth == -1 else min(module_depth, len(by_depth) - 1)
    out = [f"Top {top_modules} modules in terms of params, MACs or fwd latency at different model depths:"]
    for d in range(depth + 1):
        info = by_depth[d]

        def top(index: int, fmt: Any, info: dict = info) -> dict[str, str]:
            ranked = sorted(info.items(), key=lambda kv: kv[1][index], reverse=True)[:top_modules]
            return {k: fmt(v[index]) for k, v in ranked}

        out += [f"depth {d}:", f"    params      - {top(1, params_to_string)}",
                f"    MACs        - {top(0, macs_to_string)}", f"    fwd latency - {top(2, duration_to_string)}"]
    return out


def module_line(indent: int, name: str, type_name: str, stats: tuple[float, float, float], totals: dict) -> str:
    """One module of the detailed tree: params, MACs, latency (each with its share) and FLOP/s."""
    params, macs, seconds = stats

    def share(v: float, key: str) -> str:
        return f"{round(100 * v / totals[key], DEFAULT_PRECISION) if totals[key] else 0:g}%"

    rate = flops_to_string(round(2 * macs / seconds, DEFAULT_PRECISION) if seconds else 0.0)
    return (f"{'  ' * indent}{name or '(model)'} ({type_name}): {params_to_string(params)} = {share(params, 'params')} "
            f"Params, {macs_to_string(macs)} = {share(macs, 'macs')} MACs, {duration_to_string(seconds)} = "
            f"{share(seconds, 'duration')} latency, {rate}")
