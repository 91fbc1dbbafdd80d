"""Blockwise int8 quantization for ZeRO++ communication (qwZ weights, qgZ gradients).

Each block of ``BLOCK`` elements is scaled by its absolute maximum / 127 (symmetric, one fp32 scale per block), so
a block of 256 values travels as 256 + 4 bytes instead of 512 (bf16) or 1024 (fp32). The relative error per element
is at most half a quantization step of its block (``absmax / 254``).
"""

from __future__ import annotations

import torch

from shardwise.comm.shards import round_up

BLOCK = 256


def block_for(n: int) -> int:
    """Block size for a tensor of ``n`` elements: ``BLOCK``, or the next power of two (>= 16) for small tensors,
    so a 32-element bias is not padded to 256 codes."""
    return min(BLOCK, max(16, 1 << max(0, n - 1).bit_length()))


def padded_len(n: int, block: int = BLOCK) -> int:
    """``n`` rounded up to a whole number of blocks."""
    return round_up(n, block)


def quantize(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (padded to whole blocks) and fp32 per-block scales of a 1-D tensor."""
    n = x.numel()
    padded = torch.zeros(padded_len(n, block), dtype=torch.float32, device=x.device)
    padded[:n] = x.reshape(-1)
    blocks = padded.view(-1, block)
    scales = blocks.abs().amax(dim=1).clamp(min=1e-30) / 127.0
    codes = torch.round(blocks / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.view(-1), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, n: int, block: int = BLOCK) -> torch.Tensor:
    """fp32 values (first ``n``) from ``quantize`` output."""
    return (codes.view(-1, block).to(torch.float32) * scales[:, None]).view(-1)[:n]
