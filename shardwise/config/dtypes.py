"""The one dtype table: the short names shardwise uses ("fp32", "fp16", "bf16", "fp64"), every spelling a config
or ``init_inference`` accepts for them, their sizes, and the torch dtype each means.

Importing this module does not import torch (``shardwise.config`` loads without it: the config CLI and the launcher
read configs before any torch work); ``torch_dtype`` imports it when first asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: the spellings DeepSpeed's DtypeEnum accepts for each precision, folded to one short name
SPELLINGS: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32", "float32", "float", "torch.float32", "torch.float"),
    "fp16": ("fp16", "float16", "half", "torch.float16", "torch.half"),
    "bf16": ("bf16", "bfloat16", "torch.bfloat16"),
}
#: spellings only ``init_inference``'s ``dtype`` accepts besides those (DeepSpeed's inference config does)
INFERENCE_SPELLINGS: dict[str, str] = {"bfloat": "bf16"}
#: bytes per element
ITEMSIZE: dict[str, int] = {"fp64": 8, "fp32": 4, "fp16": 2, "bf16": 2}

_LOOKUP = {spelling: name for name, spellings in SPELLINGS.items() for spelling in spellings}
_TORCH_NAMES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def short_name(spelling: str, *, inference: bool = False) -> str | None:
    """``"bfloat16"`` -> ``"bf16"``; None if ``spelling`` is not a known precision (case and spaces ignored)."""
    key = spelling.strip().lower()
    return _LOOKUP.get(key) or (INFERENCE_SPELLINGS.get(key) if inference else None)


def torch_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"`` -> ``torch.bfloat16`` (None -> None); raises KeyError for a name not in ``ITEMSIZE``."""
    if name is None:
        return None
    import torch  # deferred: see the module docstring

    return getattr(torch, _TORCH_NAMES[name])


def name_of(dtype: torch.dtype) -> str | None:
    """``torch.bfloat16`` -> ``"bf16"``; None for a dtype outside the table."""
    text = str(dtype).removeprefix("torch.")
    return next((short for short, torch_name in _TORCH_NAMES.items() if torch_name == text), None)
