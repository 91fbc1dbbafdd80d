"""Activation bytes per micro-batch of the LLaMA reference model, counted tensor by tensor (analytic).

What autograd keeps between a block's forward and its backward, per token of the micro-batch (``e``: bytes of
the model dtype; ``h`` hidden, ``g`` key/value width = kv_heads x head_dim, ``a`` heads, ``f`` SwiGLU hidden,
``t`` tensor-parallel degree). The list is what ``shardwise.models.llama.Block`` saves with a fused
(flash-style) attention kernel, which keeps the softmax statistics, not the ``s x s`` probabilities;
``tests/unit/test_plan_activations.py`` checks it against the tensors autograd really saves.

=======================  ==========================================  ========================================
part                     saved tensors                               bytes per token
=======================  ==========================================  ========================================
RMSNorm (x2)             fp32 input (the input itself in fp32),      2 x (4h + e h + 4)
                         normalised input, 1/rms
attention                Q|K|V projection input, rotated q,          e h + e h / t + kv + 4a / t + e h / t
                         k and v (``kv``: repeated to all heads with
                         grouped-query attention: 2 e h / t; else
                         rotated k + the Q|K|V output that v views:
                         e g / t + e (h + 2g) / t), log-sum-exp,
                         output projection input
SwiGLU                   gate|up projection input, its output,       e h + e (2f + f + f) / t
                         silu(gate), the down projection's input
LM head                  final norm, head input, fp32 softmax,       (4h + e h + 4) + e h + 4 V / t + 8
                         targets (+ the loss's 4-byte total weight;  (t > 1: + 2, no total weight)
                         t > 1: local targets and two masks)
embedding                token ids (t > 1: masked ids and a mask)    8 (t > 1: 9)
=======================  ==========================================  ========================================

The rotary tables are model buffers, cast with the model (no per-layer copies). Megatron sequence parallelism
(``sequence_parallel`` with t > 1) keeps the norms on 1/t of the sequence (the column-parallel projections still
save their gathered, full-sequence input). Ulysses sequence parallelism (``ulysses`` = sp) gives each rank 1/sp
of the tokens; the all-to-all leaves per-token sizes unchanged.

Activation checkpointing (every block wrapped): a block keeps only its input, ``e h`` per token; with
``partition_activations`` 1/t of it, with ``cpu_checkpointing`` none on the device. Backward then recomputes one
block at a time, so one block's full activations come back transiently (``recompute``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shardwise.models.llama import LlamaConfig


@dataclass(frozen=True)
class ActivationSetup:
    """How activations are stored: model dtype, parallel degrees, checkpointing options."""

    dtype_bytes: int = 2
    tp: int = 1
    sequence_parallel: bool = False  # Megatron sequence parallelism (needs tp > 1)
    ulysses: int = 1  # all-to-all sequence-parallel degree
    checkpointing: bool = False  # every block wrapped in activation checkpointing
    partition_activations: bool = False  # checkpointed inputs split over the tensor-parallel ranks
    cpu_checkpointing: bool = False  # checkpointed inputs kept on the host


@dataclass(frozen=True)
class MicroBatchActivations:
    """Device bytes one micro-batch keeps alive for backward on one rank, by part."""

    per_layer: int  # one block, not checkpointed
    layers: int  # every block of this rank's model part (checkpointed or not, as configured)
    head: int  # final norm + LM head + loss (0 where this rank holds no head)
    embedding: int  # what the embedding lookup keeps (0 where this rank holds no embedding)
    boundary: int  # a received pipeline activation (stages after the first)
    recompute: int  # checkpointing: one block's activations, recomputed during backward (transient)

    @property
    def resident(self) -> int:
        """Bytes kept per in-flight micro-batch (what multiplies with the pipeline's in-flight count)."""
        return self.layers + self.head + self.embedding + self.boundary

    def as_dict(self) -> dict[str, int]:
        """JSON-ready fields plus ``resident``."""
        return {**asdict(self), "resident": self.resident}


def _per_token_layer(cfg: LlamaConfig, s: ActivationSetup) -> float:
    e, h, t, f = s.dtype_bytes, cfg.dim, s.tp, cfg.hidden
    a, g = cfg.n_heads, cfg.kv_heads * cfg.head_dim
    norm_share = 1 / t if (s.sequence_parallel and t > 1) else 1.0
    norms = 2 * (4 * h + e * h + 4) * norm_share
    if cfg.kv_heads != cfg.n_heads:
        kv = 2 * e * h / t
    else:
        kv = e * g / t + e * (h + 2 * g) / t
    attention = e * h + e * h / t + kv + 4 * a / t + e * h / t
    ffn = e * h + e * 4 * f / t
    return norms + attention + ffn


def micro_batch_activations(cfg: LlamaConfig, setup: ActivationSetup, micro_batch: int, seq_len: int,
                            n_layers: int, *, has_embedding: bool, has_head: bool,
                            receives_boundary: bool) -> MicroBatchActivations:
    """Bytes one micro-batch of ``micro_batch`` x ``seq_len`` tokens keeps on one rank holding ``n_layers`` blocks
    (the embedding, the LM head, a received pipeline activation where the flags say so)."""
    if seq_len % setup.ulysses:
        raise ValueError(f"sequence length {seq_len} does not divide by the sequence-parallel degree {setup.ulysses}")
    seq_local = seq_len // setup.ulysses
    tokens = micro_batch * seq_local
    e, h, t = setup.dtype_bytes, cfg.dim, setup.tp
    full_layer = int(tokens * _per_token_layer(cfg, setup))
    seq_share = 1 / t if (setup.sequence_parallel and t > 1) else 1.0
    if setup.checkpointing:
        split = t if setup.partition_activations else 1
        kept = 0.0 if setup.cpu_checkpointing else tokens * e * h * seq_share / split
        layers, recompute = int(kept) * n_layers, full_layer if n_layers else 0
    else:
        layers, recompute = full_layer * n_layers, 0
    head = 0
    if has_head:
        loss = tokens * 10 if t > 1 else tokens * 8 + 4
        head = int(tokens * ((4 * h + e * h + 4) * seq_share + e * h + 4 * cfg.vocab_size / t)) + loss
    embedding = tokens * (9 if t > 1 else 8) if has_embedding else 0
    boundary = int(tokens * e * h * seq_share) if receives_boundary else 0
    return MicroBatchActivations(full_layer, layers, head, embedding, boundary, recompute)
