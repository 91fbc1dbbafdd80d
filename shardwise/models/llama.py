"""A LLaMA-style decoder (RMSNorm, rotary positions, SwiGLU, grouped-query attention), written once for every
tensor-parallel degree: the reference model of the demo, the benchmarks and the parallelism tests.

``Llama(cfg)`` is plain PyTorch (``nn.Linear``, ``nn.Embedding``, ``F.cross_entropy``). ``Llama(cfg, topology)``
with a tensor-parallel degree > 1 uses the layers of ``shardwise.tp`` (Q|K|V and gate|up fused column-parallel
projections, row-parallel outputs, a vocabulary-parallel embedding, LM head and cross-entropy: Megatron's two
all-reduces forward and two backward per block), optionally with Megatron sequence parallelism
(``cfg.sequence_parallel``: norms and dropout on sequence shards, all-gather / reduce-scatter instead of
all-reduce). A sequence-parallel degree > 1 in the topology turns on all-to-all (Ulysses) attention: each rank then
feeds its own shard of the sequence, ``tokens[:, rank * s : (rank + 1) * s]``, and the loss is the mean over the
whole sequence whose gradient on each rank is its own share (right where gradients are summed over the sequence
ranks: ZeRO 0-2, as DeepSpeed 0.19; under ZeRO-3, which averages them, scale the loss by the sequence degree).

Weights are initialised from the degree-1 model drawn with the same random state and then sliced, so a model of
any degree starts from exactly the weights of the plain one (and ``load_full_state_dict`` loads a full checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from shardwise.activation_checkpointing import checkpoint
from shardwise.sp.tiled_loss import sequence_parallel_mean
from shardwise.sp.ulysses import DistributedAttention
from shardwise.tp import plans
from shardwise.tp.cross_entropy import vocab_parallel_cross_entropy
from shardwise.tp.layers import ColumnParallelLinear, GroupRef, RowParallelLinear, VocabParallelEmbedding
from shardwise.tp.partition import DimSplit
from shardwise.tp.random import fork_if
from shardwise.tp.state import full_state_dict, load_full_state_dict

if TYPE_CHECKING:
    from shardwise.comm.topology import Topology


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and options of a ``Llama``."""

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    ffn_hidden: int | None = None  # None: 8/3 * dim rounded up to multiple_of
    multiple_of: int = 16
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 128
    dropout: float = 0.0  # attention-probability and residual dropout
    sequence_parallel: bool = False  # Megatron sequence parallelism (with tensor parallelism)
    checkpoint_activations: bool = False  # shardwise.checkpointing.checkpoint around every block

    @property
    def kv_heads(self) -> int:
        """Key/value heads."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        """Size of one head."""
        return self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        """SwiGLU hidden size."""
        if self.ffn_hidden:
            return self.ffn_hidden
        h = int(8 * self.dim / 3)
        return self.multiple_of * -(-h // self.multiple_of)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for 16-bit tensors; float32/float64 stay as they are (the float64 reference stays exact)."""
    return x.float() if x.element_size() < 4 else x


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _upcast(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_tables(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, ``[max_seq_len, head_dim]`` (rotate-half convention)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (``[batch, seq, heads, head_dim]``) by the positions' angles (``cos``/``sin``: ``[seq, dim]``)."""
    a, b = x.chunk(2, dim=-1)
    rotated = torch.cat((-b, a), dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


def _core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
                    split_heads: bool) -> torch.Tensor:
    """Causal attention on ``[batch, seq, heads, dim]`` (key/value heads repeated for grouped queries)."""
    if k.shape[2] != q.shape[2]:
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    with fork_if(split_heads and dropout > 0):  # heads split across ranks: independent masks per rank
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, dropout_p=dropout)
    return out.transpose(1, 2)


def _linear(cfg: LlamaConfig, tp: Any, kind: str, n_in: int, n_out: int, split: DimSplit | None) -> nn.Module:
    if tp.size == 1:
        return nn.Linear(n_in, n_out, bias=False)
    cls = ColumnParallelLinear if kind == "col" else RowParallelLinear
    return cls(n_in, n_out, bias=False, group=tp, sequence_parallel=cfg.sequence_parallel, split=split)


class Attention(nn.Module):
    """Grouped-query attention with a fused Q|K|V projection."""

    def __init__(self, cfg: LlamaConfig, tp: Any, sp: Any) -> None:
        super().__init__()
        hd, h, kv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
        n = tp.size
        if h % n or kv % n:
            raise ValueError(f"{h} query and {kv} key/value heads must both divide by the tensor-parallel degree {n}")
        qkv = DimSplit.of((h + 2 * kv) * hd, n, hd, parts=(h * hd, kv * hd, kv * hd))
        self.wqkv = _linear(cfg, tp, "col", cfg.dim, (h + 2 * kv) * hd, qkv)
        self.wo = _linear(cfg, tp, "row", h * hd, cfg.dim, DimSplit.of(h * hd, n, hd))
        self.head_dim, self.heads, self.kv = hd, h, kv
        self.dropout = cfg.dropout
        self.ulysses = DistributedAttention(self._local, sp, scatter_idx=2, gather_idx=1) if sp.size > 1 else None
        self.sp_size = sp.size

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        split = q.shape[2] < self.heads  # this rank sees a subset of the heads
        return _core_attention(q, k, v, self.dropout if self.training else 0.0, split)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.wqkv(x)
        b, s = qkv.shape[:2]
        local_heads = qkv.shape[-1] // self.head_dim  # q + k + v heads on this rank (any TP scheme)
        hq = local_heads * self.heads // (self.heads + 2 * self.kv)
        hkv = (local_heads - hq) // 2
        q, k, v = qkv.split([hq * self.head_dim, hkv * self.head_dim, hkv * self.head_dim], dim=-1)
        q, k, v = (t.reshape(b, s, -1, self.head_dim) for t in (q, k, v))
        q, k = apply_rotary(q, cos[:s], sin[:s]), apply_rotary(k, cos[:s], sin[:s])
        if self.ulysses is not None:
            if hkv % self.sp_size:  # every sequence rank needs the key/value heads of its query heads
                rep = hq // hkv
                k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
            out = self.ulysses(q, k, v, 0)
        else:
            out = self._local(q, k, v)
        return self.wo(out.reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU with a fused gate|up projection."""

    def __init__(self, cfg: LlamaConfig, tp: Any) -> None:
        super().__init__()
        f, n = cfg.hidden, tp.size
        self.w13 = _linear(cfg, tp, "col", cfg.dim, 2 * f, DimSplit.of(2 * f, n, parts=(f, f)))
        self.w2 = _linear(cfg, tp, "row", f, cfg.dim, DimSplit.of(f, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm decoder block."""

    def __init__(self, cfg: LlamaConfig, tp: Any, sp: Any) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, tp, sp)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg, tp)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # with Megatron sequence parallelism the residual stream is split across tensor ranks: independent masks
        sharded = getattr(self.attn.wo, "sequence_parallel", False) and self.drop.p > 0 and self.training
        a = self.attn(self.attn_norm(x), cos, sin)
        with fork_if(sharded):
            h = x + self.drop(a)
        m = self.ffn(self.ffn_norm(h))
        with fork_if(sharded):
            return h + self.drop(m)


class Llama(nn.Module):
    """The decoder. ``forward(tokens, targets=None)`` returns logits (this rank's vocabulary slice when tensor
    parallel) or, with ``targets``, the mean next-token cross-entropy over this rank's tokens."""

    def __init__(self, cfg: LlamaConfig, topology: Topology | None = None) -> None:
        super().__init__()
        from shardwise.tp.mappings import resolve_group, solo_group

        tp = resolve_group(topology.tp_group) if topology is not None else solo_group()
        sp = resolve_group(topology.sp_group) if topology is not None else solo_group()
        if cfg.sequence_parallel and sp.size > 1:
            raise ValueError("Megatron sequence parallelism (cfg.sequence_parallel) and all-to-all sequence "
                             "parallelism (a topology with sp > 1) are not combined in this model; choose one")
        full = Llama(replace(cfg, sequence_parallel=False)).state_dict() if tp.size > 1 else None
        rng_after_full_init = torch.get_rng_state()
        self.cfg, self._sp = cfg, GroupRef(sp)
        sp_flag = cfg.sequence_parallel and tp.size > 1
        if tp.size == 1:
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        else:
            self.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, group=tp, sequence_parallel=sp_flag)
            self.output = ColumnParallelLinear(cfg.dim, cfg.vocab_size, bias=False, group=tp,
                                               sequence_parallel=sp_flag)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, tp, sp) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if sp_flag:  # norms see only their sequence shard: their gradients are summed over the tensor group
            for norm in (m for m in self.modules() if isinstance(m, RMSNorm)):
                norm.weight.sequence_parallel = True
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if full is None:
            self.apply(self._init)
        else:
            torch.set_rng_state(rng_after_full_init)  # the same random state as after building the plain model
            self.load_full_state_dict(full)

    @property
    def sp_group(self) -> Any:
        """The all-to-all sequence-parallel group (one rank: off)."""
        return self._sp.value

    @property
    def tp_size(self) -> int:
        """Tensor-parallel degree (read from the LM head, so it is right after ``apply_plan`` too)."""
        return self.output.tp_world if isinstance(self.output, ColumnParallelLinear) else 1

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        s = tokens.shape[1]
        offset = self.sp_group.rank * s if self.sp_group.size > 1 else 0  # Ulysses: this rank's sequence shard
        cos = self.rope_cos[offset : offset + s]
        sin = self.rope_sin[offset : offset + s]
        cos.no_checkpointing = sin.no_checkpointing = True  # constants: never partitioned or offloaded
        sharded = self.cfg.sequence_parallel and self.tp_size > 1
        h = self.tok_embeddings(tokens)
        with fork_if(sharded and self.drop.p > 0 and self.training):
            h = self.drop(h)
        for layer in self.layers:
            h = checkpoint(layer, h, cos, sin) if self.cfg.checkpoint_activations and self.training else \
                layer(h, cos, sin)
        logits = self.output(self.norm(h))
        if targets is None:
            return logits
        if isinstance(self.output, ColumnParallelLinear) and self.output.tp_world > 1:
            losses = vocab_parallel_cross_entropy(logits, targets, self.output.group, split=self.output.split)
            loss_sum = losses.sum() if self.sp_group.size > 1 else None
            if loss_sum is None:
                return losses.mean()
        elif self.sp_group.size > 1:
            loss_sum = F.cross_entropy(_upcast(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       reduction="sum")
        else:
            return F.cross_entropy(_upcast(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1))
        # Ulysses: the mean over the whole sequence, each rank's gradient its own share (summed over the sequence
        # ranks by ZeRO 0-2; [Note: sequence-parallel gradient reduction] in engine/engine.py)
        return sequence_parallel_mean(loss_sum, targets.numel(), self.sp_group)

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
        """Load the plain (degree-1) model's state dict, slicing split weights for this rank."""
        return load_full_state_dict(self, state_dict, strict=strict)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain model's state dict (collective over the tensor group)."""
        return full_state_dict(self)

    def num_parameters(self) -> int:
        """Parameter elements on this rank."""
        return sum(p.numel() for p in self.parameters())


def tp_plan(cfg: LlamaConfig) -> dict[str, Any]:
    """The tensor-parallel plan that turns a plain ``Llama(cfg)`` into the degree-n model (``apply_plan``)."""
    sp, hd, h, kv, f = cfg.sequence_parallel, cfg.head_dim, cfg.n_heads, cfg.kv_heads, cfg.hidden
    plan: dict[str, Any] = {
        "tok_embeddings": plans.VocabParallel(sequence_parallel=sp),
        "layers.*.attn.wqkv": plans.ColwiseParallel(sequence_parallel=sp, grain=hd, parts=(h * hd, kv * hd, kv * hd)),
        "layers.*.attn.wo": plans.RowwiseParallel(sequence_parallel=sp, grain=hd),
        "layers.*.ffn.w13": plans.ColwiseParallel(sequence_parallel=sp, parts=(f, f)),
        "layers.*.ffn.w2": plans.RowwiseParallel(sequence_parallel=sp),
        "output": plans.ColwiseParallel(sequence_parallel=sp),
    }
    if sp:
        plan.update({"layers.*.attn_norm": plans.SequenceParallel(), "layers.*.ffn_norm": plans.SequenceParallel(),
                     "norm": plans.SequenceParallel()})
    return plan
