"""Deterministic mode (``"deterministic": true``, a shardwise key, off by default): identical runs, identical bits.

Gaudi's DeepSpeed enforces deterministic behaviour when it initialises; DeepSpeed itself leaves it to the script.
With the key on, ``initialize()`` calls :func:`enable_deterministic` before it builds anything:

- ``torch.use_deterministic_algorithms(True)``: torch picks deterministic kernels, and raises for an operation that
  has none (naming it) instead of running a nondeterministic one;
- cuDNN: ``deterministic = True``, ``benchmark = False`` (no autotuned algorithm choice that may differ by run);
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset (CUDA's cuBLAS needs it for deterministic matmuls).

[Note: reduction order] Every reduction shardwise itself issues has an order fixed by the program, not by timing,
so it needs no switch; deterministic mode documents and tests that:

- ZeRO 0-2 buckets: the layout (``zero/layout.py``) orders parameters by registration, each bucket's collective
  is launched when its last gradient arrives (autograd's order for a given graph is fixed) or at the end of backward
  in bucket order, and collectives complete into disjoint slices, so overlap (``overlap_comm``) changes when a sum
  happens, never which values are summed in which order;
- accumulation over micro-steps adds each micro-step's reduced (or local) gradient into the same buffer, in
  micro-step order;
- ZeRO-3: a unit's gradients are reduce-scattered once all of them arrived; units complete into disjoint shards;
  the set of gathered units (``Stage3Strategy._live``) is only iterated to free memory, never to compute or
  communicate;
- the global gradient norm: per-rank float64 sums of ``torch._foreach_norm`` results in group order, then
  all-reduces over fixed groups;
- shardwise's own gloo reduce-scatter (``comm/direct.py``): the owner adds its chunk and then the peers' in a fixed
  rank order, after every message has arrived, whatever order they arrived in;
- the collectives: gloo's and NCCL's algorithms reduce in an order fixed by the ranks and the message size (NCCL
  also by ``NCCL_ALGO``/``NCCL_PROTO`` and the topology: keep them the same between runs);
- pipeline and tensor parallelism: point-to-point sends in schedule order; tensor-parallel all-reduces in forward
  and backward order.

What stays the user's: seeds (``torch.manual_seed``, data order), the same number of ranks, threads
(``OMP_NUM_THREADS``: CPU kernels split reductions by thread count) and library versions.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from shardwise.config import ShardwiseConfig


CUBLAS_WORKSPACE = ":4096:8"


def enable_deterministic(config: ShardwiseConfig) -> bool:
    """Switch torch to deterministic algorithms when ``config.deterministic`` is on; returns whether it did."""
    if not getattr(config, "deterministic", False):
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return True
