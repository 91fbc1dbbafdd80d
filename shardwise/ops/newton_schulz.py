"""Newton-Schulz orthogonalisation and the per-matrix arithmetic Muon applies (no optimizer state, no comms).

Shared by the single-process optimizer (``muon.py``) and its ZeRO-partitioned form (``muon_partition.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from shardwise.config.dtypes import torch_dtype

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_METHODS = ("gram", "standard")
NS_DTYPES = {name: torch_dtype(name) for name in ("fp32", "bf16", "fp16", "fp64")}  # the names ns_dtype accepts
_NS_EPS = 1e-7


def _standard(x: Tensor, steps: int, coefficients: tuple[float, float, float]) -> Tensor:
    a, b, c = coefficients
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x


def _gram(x: Tensor, steps: int, coefficients: tuple[float, float, float]) -> Tensor:
    """The same iteration carried on the small Gram matrix ``R = X X^T``: ``X_k = Q_k X_0`` with
    ``Q_{k+1} = P(R_k) Q_k``, ``R_{k+1} = P(R_k)^2 R_k`` (P is a polynomial in R, so they commute); X is
    recomputed once after two steps to bound the drift. Fewer FLOPs when ``cols >> rows``."""
    a, b, c = coefficients
    if x.size(0) == x.size(1):
        return _standard(x, steps, coefficients)
    eye = torch.eye(x.size(0), dtype=x.dtype, device=x.device)
    r, q = x @ x.T, eye
    for i in range(steps):
        if i == 2:  # restart: fold Q into X
            x, q = q @ x, eye
            r = x @ x.T
        p = a * eye + b * r + c * (r @ r)
        q = p @ q
        if i < steps - 1:
            r = p @ (p @ r)
    return q @ x


def orthogonalize(update: Tensor, *, steps: int = 5, method: str = "gram",
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS, dtype: torch.dtype | None = None
                  ) -> Tensor:
    """Newton-Schulz approximation of ``U V^T`` for ``update = U S V^T`` (a 2-D matrix), in ``dtype``."""
    x = update.to(dtype or update.dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=_NS_EPS)
    x = (_gram if method == "gram" else _standard)(x, steps, tuple(coefficients))
    return x.T if tall else x


def lr_ratio(rows: int, cols: int, adjust_lr_fn: str | None) -> float:
    """Per-matrix scale of Muon's step (torch.optim.Muon's ``adjust_lr_fn``)."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view Muon orthogonalises: ``(shape[0], prod(shape[1:]))``."""
    rows = int(shape[0])
    return rows, int(math.prod(shape)) // rows


def ns_dtype(group: dict[str, Any], tensor: Tensor) -> torch.dtype:
    """Compute dtype of Newton-Schulz: the group's ``ns_dtype``; "auto" is bf16 (standard) or fp16 (gram) on an
    accelerator, as DeepSpeed, and the tensor's own dtype on CPU (fp32, or fp64 in exactness tests)."""
    name = group.get("ns_dtype", "auto")
    if name != "auto":
        return NS_DTYPES[name]
    if tensor.device.type == "cpu":
        return tensor.dtype
    return torch.float16 if group.get("ns_method", "gram") == "gram" else torch.bfloat16


def muon_direction(update: Tensor, shape: torch.Size | tuple[int, ...], group: dict[str, Any]
                   ) -> tuple[Tensor, float]:
    """``NS(update viewed as a matrix)`` flattened, in ``update``'s dtype, and the matrix's step ``ratio``."""
    rows, cols = matrix_shape(shape)
    out = orthogonalize(update.reshape(rows, cols), steps=group["ns_steps"], method=group["ns_method"],
                        coefficients=group["ns_coefficients"], dtype=ns_dtype(group, update))
    return out.to(update.dtype).reshape(-1), lr_ratio(rows, cols, group["adjust_lr_fn"])
