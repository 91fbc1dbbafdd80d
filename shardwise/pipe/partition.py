"""Which layers each pipeline stage owns: pure functions from layer weights to stage boundaries (no torch).

A partition of ``n`` layers into ``k`` parts is a list ``parts`` of ``k + 1`` boundaries: part ``i`` holds layers
``parts[i] <= idx < parts[i + 1]`` (DeepSpeed's ``PipelineModule.parts`` convention). Methods, as DeepSpeed names
them in ``partition_method``:

* ``uniform``: the same number of layers per part; the first ``n % k`` parts take one more;
* ``parameters``: balance the trainable-parameter count (the weights), minimising the largest part;
* ``type:<regex>``: balance the number of layers whose class name matches ``regex`` (case-insensitive), e.g.
  ``type:TransformerBlock`` puts the same number of blocks on every stage wherever the embeddings fall.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["partition_uniform", "partition_balanced", "partition_layers", "PartitionError"]


class PartitionError(ValueError):
    """The requested partition method cannot be applied; the message says why and how to fix it."""


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Boundaries splitting ``num_items`` into ``num_parts`` runs whose lengths differ by at most one."""
    if num_parts < 1:
        raise PartitionError(f"cannot split into {num_parts} parts")
    base, extra = divmod(num_items, num_parts)
    parts = [0]
    for i in range(num_parts):
        parts.append(parts[-1] + base + (1 if i < extra else 0))
    return parts


def _fits(weights: Sequence[float], num_parts: int, cap: float) -> bool:
    """Whether contiguous runs with sums <= ``cap`` cover ``weights`` in at most ``num_parts`` runs."""
    used, run = 1, 0.0
    for w in weights:
        if w > cap:
            return False
        if run + w > cap:
            used += 1
            run = 0.0
        run += w
    return used <= num_parts


def partition_balanced(weights: Sequence[float], num_parts: int) -> list[int]:
    """Contiguous boundaries minimising the heaviest part (the linear partition problem).

    The optimal bottleneck is found exactly by bisection over the candidate sums (every part's weight is a sum of
    consecutive weights). Among optimal partitions, layers are assigned back to front, greedily up to the bottleneck,
    so earlier stages (which also hold the embeddings and keep the most activations alive under 1F1B) get the
    lighter remainder; every part gets at least one layer while there are enough layers.
    """
    n = len(weights)
    if num_parts < 1:
        raise PartitionError(f"cannot split into {num_parts} parts")
    if any(w < 0 for w in weights):
        raise PartitionError("layer weights must be non-negative")
    if n <= num_parts:
        return [min(i, n) for i in range(num_parts + 1)]
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    candidates = sorted({prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(weights, num_parts, candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return _assign_back_to_front(weights, num_parts, candidates[lo])


def _assign_back_to_front(weights: Sequence[float], num_parts: int, cap: float) -> list[int]:
    n = len(weights)
    bounds = [n]
    end = n
    for part in range(num_parts - 1, 0, -1):
        start, run = end, 0.0
        # take layers while under the cap, but leave at least one layer for each earlier part
        while start - 1 >= part and run + weights[start - 1] <= cap:
            start -= 1
            run += weights[start]
        if start == end:  # a zero-capacity corner (all weights zero so far): still give this part one layer
            start -= 1
        bounds.append(start)
        end = start
    bounds.append(0)
    return bounds[::-1]


def partition_layers(method: str, num_parts: int, names: Sequence[str], param_counts: Sequence[int]) -> list[int]:
    """Boundaries for ``partition_method`` given each layer's type name and trainable-parameter count."""
    key = method.strip()
    lowered = key.lower()
    if lowered == "uniform":
        return partition_uniform(len(names), num_parts)
    if lowered == "parameters":
        return partition_balanced(list(param_counts), num_parts)
    if lowered.startswith("type:"):
        pattern = key.split(":", 1)[1]
        regex = re.compile(pattern, re.IGNORECASE)
        marks = [1 if name and regex.search(name) else 0 for name in names]
        if not any(marks):
            raise PartitionError(
                f"partition_method {method!r} matches no layer; layer types are {sorted(set(names))}. "
                "Fix the regular expression after 'type:' (case-insensitive search in the class name)"
            )
        return partition_balanced(marks, num_parts)
    raise PartitionError(
        f"partition_method {method!r} is not supported; use 'parameters', 'uniform' or 'type:<regex>'"
    )
