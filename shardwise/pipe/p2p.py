"""Moving activations and gradients between pipeline stages: point-to-point messages with a metadata handshake.

A stage boundary carries a tensor or a tuple of tensors of any dtype and shape. Before the first transfer on a
channel (one direction between two ranks, one kind: activations or gradients, train or eval) the sender sends a
fixed-size int64 header describing each tensor (dtype, shape, requires-grad flag, whether it is split over
tensor-parallel ranks); later transfers reuse it and send only data. With ``dynamic_shape`` the header goes with
every transfer, so shapes may change between micro-batches; without it a changed shape is an error naming the fix.
The receiver allocates buffers from the header and marks floating tensors the sender tracked as requiring grad,
so gradients flow back for exactly those.

Tensor parallelism (``pipeline.pipe_partitioned`` / ``grad_partitioned``): a boundary tensor that is identical on
every tensor-parallel rank of a stage (the usual Megatron hidden state) would be sent ``tp`` times over the slow
inter-stage link. Instead each tensor-parallel rank sends 1/tp of it to its peer on the next stage, and the
receivers all-gather over their (fast, intra-node) tensor-parallel group. Whether a tensor is replicated is
checked once, at the handshake, by comparing fingerprints over the tensor group: tensors that differ per rank
(Megatron sequence parallelism already splits the hidden state along the sequence) are sent whole.

Sends are non-blocking (``isend``); the handles are kept until ``wait()`` (end of the batch) so the buffers stay
alive. Receives block. See ``schedule.py`` [Note: p2p ordering] for why that cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from shardwise import comm
from shardwise.comm.collectives import all_gather_padded
from shardwise.comm.shards import ceil_div, padded_shard

if TYPE_CHECKING:
    from shardwise.comm.topology import Topology


__all__ = ["P2P", "TensorMeta", "PipelineCommError", "META_SLOTS"]

#: int64 slots in the handshake header (enough for 16 tensors of up to 8 dims)
META_SLOTS = 192
_MAGIC = 0x5057  # "PW": catches a header/data mismatch on the wire early
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16,
           torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128]
_DTYPE_ID = {d: i for i, d in enumerate(_DTYPES)}


class PipelineCommError(RuntimeError):
    """A stage-boundary transfer cannot proceed; the message names the tensors and the fix."""


@dataclass(frozen=True)
class TensorMeta:
    """What the receiver needs to allocate one boundary tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool
    split: bool  # sent as 1/tp slices and all-gathered over the receiver's tensor-parallel group

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n


def _signature(tensors: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((t.dtype, tuple(t.shape), bool(t.requires_grad)) for t in tensors)


def encode_meta(metas: list[TensorMeta]) -> torch.Tensor:
    """The fixed-size int64 header for ``metas``."""
    values = [_MAGIC, len(metas)]
    for m in metas:
        values += [_DTYPE_ID[m.dtype], int(m.requires_grad) | (int(m.split) << 1), len(m.shape), *m.shape]
    if len(values) > META_SLOTS:
        raise PipelineCommError(
            f"stage boundary of {len(metas)} tensors needs {len(values)} header slots (> {META_SLOTS}); pass "
            "fewer tensors between stages (pack them into one) or fewer dimensions"
        )
    header = torch.zeros(META_SLOTS, dtype=torch.int64)
    header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return header


def decode_meta(header: torch.Tensor) -> list[TensorMeta]:
    """Inverse of ``encode_meta``."""
    values = header.tolist()
    if values[0] != _MAGIC:
        raise PipelineCommError(
            "received a pipeline header that is not one: the stages disagree on what is sent (different schedules "
            "or models on neighbouring stages?)"
        )
    metas, i = [], 2
    for _ in range(values[1]):
        dtype_id, flags, ndim = values[i : i + 3]
        shape = tuple(values[i + 3 : i + 3 + ndim])
        metas.append(TensorMeta(_DTYPES[dtype_id], shape, bool(flags & 1), bool(flags & 2)))
        i += 3 + ndim
    return metas


def as_tensor_tuple(value: Any, what: str) -> tuple[torch.Tensor, ...]:
    """A stage boundary value as a tuple of tensors, or a clear error."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    bad = [type(v).__name__ for v in items if not torch.is_tensor(v)]
    if bad:
        raise PipelineCommError(
            f"{what} must be a tensor or a tuple of tensors to cross a pipeline stage boundary; got {bad}. "
            "Return tensors from the last layer of each stage (pass other values as tensors, or compute them "
            "on the stage that needs them)"
        )
    return tuple(items)


class P2P:
    """Send/receive boundary tensors between pipeline ranks of one topology."""

    def __init__(self, topology: Topology, *, pipe_partitioned: bool, grad_partitioned: bool,
                 dynamic_shape: bool = False) -> None:
        self.pp_group = topology.pp_group
        self.tp_group = topology.tp_group
        self.split_activations = pipe_partitioned and self.tp_group.size > 1
        self.split_grads = grad_partitioned and self.tp_group.size > 1
        self.dynamic_shape = dynamic_shape
        self._sent: dict[tuple, tuple[tuple, list[TensorMeta]]] = {}
        self._received: dict[tuple, list[TensorMeta]] = {}
        self._pending: list[tuple[comm.Handle, torch.Tensor]] = []

    def reset(self) -> None:
        """Forget every handshake (``engine.reset_activation_shape()``): the next transfers renegotiate shapes."""
        self._sent.clear()
        self._received.clear()

    # -- sending ------------------------------------------------------------------------------------------------------
    def send(self, tensors: tuple[torch.Tensor, ...], dst: int, tag: int, *, grads: bool = False) -> None:
        """Send ``tensors`` to global rank ``dst`` (non-blocking); the header first when the channel needs one."""
        key = (dst, tag, torch.is_grad_enabled())
        sig = _signature(tensors)
        known = self._sent.get(key)
        if known is None or self.dynamic_shape:
            metas = self._describe(tensors, grads)
            self._isend(encode_meta(metas), dst, tag)
            self._sent[key] = (sig, metas)
        elif known[0] != sig:
            raise PipelineCommError(
                f"the tensors sent to rank {dst} changed from {_show(known[0])} to {_show(sig)} since the first "
                "micro-batch; pass dynamic_shape=True to PipelineModule for shapes that vary, or call "
                "engine.reset_activation_shape() when they change (e.g. a new sequence length)"
            )
        metas = self._sent[key][1]
        for t, meta in zip(tensors, metas):
            self._isend(self._payload(t.detach(), meta), dst, tag)
        self._prune()

    def _describe(self, tensors: tuple[torch.Tensor, ...], grads: bool) -> list[TensorMeta]:
        split = self.split_grads if grads else self.split_activations
        replicated = self._replicated(tensors) if split else [False] * len(tensors)
        return [TensorMeta(t.dtype, tuple(t.shape), bool(t.requires_grad and not grads and t.is_floating_point()),
                           rep) for t, rep in zip(tensors, replicated)]

    def _replicated(self, tensors: tuple[torch.Tensor, ...]) -> list[bool]:
        """Per tensor: identical on every tensor-parallel rank? (one small all-gather of fingerprints)"""
        prints = torch.stack([_fingerprint(t) for t in tensors]).reshape(-1)
        gathered = torch.empty(prints.numel() * self.tp_group.size, dtype=prints.dtype)
        comm.all_gather_into_tensor(gathered, prints, group=self.tp_group)
        rows = gathered.view(self.tp_group.size, len(tensors), -1)
        return [bool((rows[:, i] == rows[0, i]).all()) for i in range(len(tensors))]

    def _payload(self, t: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
        flat = t.reshape(-1)
        if t.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        if meta.split:
            flat = padded_shard(flat, self.tp_group.size, self.tp_group.rank)
        return flat.contiguous()

    def _isend(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self._pending.append((comm.isend(t, dst, group=self.pp_group, tag=tag), t))

    def _prune(self) -> None:
        if len(self._pending) > 64:
            self._pending = [(h, t) for h, t in self._pending if not h.is_completed()]

    def wait(self) -> None:
        """Block until every send of this rank has been delivered (call once per batch)."""
        for handle, _ in self._pending:
            handle.wait()
        self._pending.clear()

    # -- receiving ----------------------------------------------------------------------------------------------------
    def recv(self, src: int, tag: int, device: torch.device, *, grads: bool = False) -> tuple[torch.Tensor, ...]:
        """Receive the tensors global rank ``src`` sends on ``tag``; activations come back as leaves that require
        grad where the sender's did."""
        key = (src, tag, torch.is_grad_enabled())
        metas = self._received.get(key)
        if metas is None or self.dynamic_shape:
            header = torch.empty(META_SLOTS, dtype=torch.int64)
            comm.recv(header, src, group=self.pp_group, tag=tag)
            metas = self._received[key] = decode_meta(header)
        out = []
        for meta in metas:
            t = self._receive_one(meta, src, tag, device)
            if meta.requires_grad and not grads:
                t.requires_grad_(True)
            out.append(t)
        return tuple(out)

    def _receive_one(self, meta: TensorMeta, src: int, tag: int, device: torch.device) -> torch.Tensor:
        wire = torch.uint8 if meta.dtype == torch.bool else meta.dtype
        if not meta.split:
            buf = torch.empty(meta.numel, dtype=wire, device=device)
            comm.recv(buf, src, group=self.pp_group, tag=tag)
        else:
            part = torch.empty(ceil_div(meta.numel, self.tp_group.size), dtype=wire, device=device)
            comm.recv(part, src, group=self.pp_group, tag=tag)
            buf = all_gather_padded(part, meta.numel, self.tp_group)
        if meta.dtype == torch.bool:
            buf = buf.to(torch.bool)
        return buf.view(meta.shape)


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Three float64 numbers that differ when two tensors differ (order-sensitive), equal when they are equal."""
    x = t.detach().reshape(-1)
    x = x.to(torch.float64) if not torch.is_complex(x) else torch.view_as_real(x).reshape(-1).to(torch.float64)
    if x.numel() == 0:
        return torch.zeros(3, dtype=torch.float64)
    weights = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device)
    return torch.stack([x.sum(), (x * x).sum(), (x * weights).sum()]).cpu()


def _show(sig: tuple) -> str:
    return "[" + ", ".join(f"{str(d).replace('torch.', '')}{list(s)}" for d, s, _ in sig) + "]"
