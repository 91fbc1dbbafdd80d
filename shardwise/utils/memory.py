"""Memory reports: DeepSpeed's ``see_memory_usage`` and the per-rank breakdown printed with ``memory_breakdown``.

``see_memory_usage(message, force=True)`` prints, on rank 0, the accelerator allocator's current and peak
allocated and reserved memory (DeepSpeed's ``MA / Max_MA / CA / Max_CA``) and the host's used memory, then starts
a new peak window, as DeepSpeed does.

``memory_breakdown_rows`` / ``format_breakdown`` give one row per rank: the model states the sharding strategy
holds (``engine.memory_breakdown()``: parameters, gradients, fp32 master weights, optimizer states), the peak
allocated during the step-log window, their difference (activations, temporaries and, on CPU where the
"allocator" is the process's resident set, the runtime itself), and the allocator's current and reserved bytes.
The engine prints it every ``steps_per_print`` steps when the config has ``"memory_breakdown": true``.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import psutil
import torch

from shardwise import comm
from shardwise.accelerator import get_accelerator

if TYPE_CHECKING:
    from shardwise.engine.engine import Engine


GB = 1024**3
MB = 1024**2
STATE_KINDS = ("parameters", "gradients", "master_weights", "optimizer_states")
COLUMNS = (*STATE_KINDS, "model_states", "peak_allocated", "activations_and_other", "allocated", "reserved")


class HasMemoryBreakdown(Protocol):
    """What the breakdown needs of an engine."""

    def memory_breakdown(self) -> dict[str, int]:
        """Model-state bytes by kind on this rank."""
        ...


def see_memory_usage(message: str, force: bool = False) -> None:
    """Print ``message`` and the allocator/host memory on rank 0 when ``force`` (DeepSpeed's signature)."""
    if not force or comm.get_rank() != 0:
        return
    gc.collect()  # collect unreachable tensors first, so the numbers reflect live memory
    acc = get_accelerator()
    stats = acc.memory_stats()
    reserved = stats.get("reserved_bytes", stats.get("allocated_bytes", 0))
    print(message)
    print(f"MA {acc.memory_allocated() / GB:.2f} GB         Max_MA {acc.max_memory_allocated() / GB:.2f} GB         "
          f"CA {reserved / GB:.2f} GB         Max_CA {max(reserved, acc.max_memory_allocated()) / GB:.2f} GB ")
    vm = psutil.virtual_memory()
    print(f"CPU Virtual Memory:  used = {(vm.total - vm.available) / GB:.2f} GB, percent = {vm.percent}%")
    acc.reset_peak_memory_stats()


def local_row(engine: HasMemoryBreakdown, peak_bytes: float) -> list[float]:
    """This rank's values, in ``COLUMNS`` order (bytes); ``peak_bytes`` is the window's peak allocated."""
    states = engine.memory_breakdown() or {}
    kinds = [float(states.get(k, 0)) for k in STATE_KINDS]
    total = sum(float(v) for v in states.values())
    stats = get_accelerator().memory_stats()
    allocated = float(stats.get("allocated_bytes", 0))
    reserved = float(stats.get("reserved_bytes", allocated))
    peak = max(float(peak_bytes), allocated)
    return [*kinds, total, peak, max(peak - total, 0.0), allocated, reserved]


def memory_breakdown_rows(engine: HasMemoryBreakdown, peak_bytes: float) -> list[list[float]]:
    """Every rank's ``local_row`` (one all-gather; every rank must call it)."""
    mine = torch.tensor(local_row(engine, peak_bytes), dtype=torch.float64)
    world = comm.get_world_size()
    if world == 1:
        return [mine.tolist()]
    out = torch.zeros(world * len(COLUMNS), dtype=torch.float64)
    comm.all_gather_into_tensor(out, mine)
    return out.view(world, len(COLUMNS)).tolist()


def format_breakdown(rows: Sequence[Sequence[float]], title: str = "memory") -> str:
    """The rows as a table in MB, one line per rank."""
    heads = ("rank", "params", "grads", "master", "optim", "states", "peak", "act+other", "alloc", "reserved")
    lines = [f"{title} (MB per rank; act+other = peak - model states)",
             "".join(f"{h:>10}" for h in heads)]
    for rank, row in enumerate(rows):
        lines.append(f"{rank:>10}" + "".join(f"{v / MB:>10.1f}" for v in row))
    return "\n".join(lines)


def print_memory_breakdown(engine: Engine, peak_bytes: float, title: str = "memory") -> list[list[float]]:
    """Gather every rank's row and print the table on rank 0; returns the rows (bytes) on every rank."""
    rows = memory_breakdown_rows(engine, peak_bytes)
    if comm.get_rank() == 0:
        from shardwise.common.logging import logger

        logger.info("%s", format_breakdown(rows, title))
    return rows
