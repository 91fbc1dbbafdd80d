"""The LLaMA reference model (``shardwise.models.llama``) as pipeline layers: an embedding layer, one layer per
decoder block, and the final norm + LM head, with the vocabulary-parallel cross-entropy as the pipeline's loss.

``llama_pipe_specs(cfg, topology)`` is the layer list a ``PipelineModule`` partitions (``partition_method=
"type:BlockPipe"`` balances the blocks); ``pipe_name`` / ``llama_name`` map parameter names between this layout and
the plain ``Llama``, so a stage can load the plain model's weights (``load_plain_weights``) and report its own under
the plain names (``stage_full_weights``). Used by ``examples/llama_3d.py`` and by the layout planner
(``shardwise.plan``), which builds these stages on the meta device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardwise.comm.topology import Topology
from shardwise.models.llama import Block, LlamaConfig, RMSNorm, rotary_tables
from shardwise.pipe import LayerSpec, PipelineModule
from shardwise.tp.cross_entropy import vocab_parallel_cross_entropy
from shardwise.tp.layers import ColumnParallelLinear, VocabParallelEmbedding
from shardwise.tp.mappings import resolve_group, solo_group
from shardwise.tp.random import fork_if
from shardwise.tp.state import full_state_dict, load_full_state_dict

__all__ = ["BlockPipe", "EmbeddingPipe", "LlamaPipeLoss", "NormHeadPipe", "llama_name", "llama_pipe_specs",
           "load_plain_weights", "pipe_name", "stage_full_weights"]


def _sequence_parallel(cfg: LlamaConfig, tp: Any) -> bool:
    return cfg.sequence_parallel and tp.size > 1


class EmbeddingPipe(nn.Module):
    """Token embedding (vocabulary-parallel); with sequence parallelism its output is this rank's sequence shard."""

    def __init__(self, cfg: LlamaConfig, topology: Topology) -> None:
        super().__init__()
        tp = resolve_group(topology.tp_group)
        self.sharded = _sequence_parallel(cfg, tp)
        if tp.size == 1:
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        else:
            self.tok_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.dim, group=tp,
                                                         sequence_parallel=self.sharded)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        with fork_if(self.sharded and self.drop.p > 0 and self.training):
            return self.drop(h)


class BlockPipe(nn.Module):
    """One decoder block; the rotary tables travel with it instead of between stages."""

    def __init__(self, cfg: LlamaConfig, topology: Topology) -> None:
        super().__init__()
        tp = resolve_group(topology.tp_group)
        self.block = Block(cfg, tp, solo_group())
        if _sequence_parallel(cfg, tp):  # norms see a sequence shard: their gradients are summed over tensor ranks
            self.block.attn_norm.weight.sequence_parallel = True
            self.block.ffn_norm.weight.sequence_parallel = True
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.rope_cos.no_checkpointing = self.rope_sin.no_checkpointing = True  # constants
        return self.block(h, self.rope_cos, self.rope_sin)


class NormHeadPipe(nn.Module):
    """Final RMSNorm and the (column-parallel) LM head: logits of this rank's vocabulary slice."""

    def __init__(self, cfg: LlamaConfig, topology: Topology) -> None:
        super().__init__()
        tp = resolve_group(topology.tp_group)
        sharded = _sequence_parallel(cfg, tp)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if sharded:
            self.norm.weight.sequence_parallel = True
        self.output = (nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if tp.size == 1 else
                       ColumnParallelLinear(cfg.dim, cfg.vocab_size, bias=False, group=tp, sequence_parallel=sharded))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))


class LlamaPipeLoss:
    """Mean next-token cross-entropy of vocabulary-parallel logits (the pipeline's ``loss_fn``)."""

    def __init__(self, topology: Topology) -> None:
        self.group = resolve_group(topology.tp_group)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            x = logits.float() if logits.element_size() < 4 else logits
            return F.cross_entropy(x.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return vocab_parallel_cross_entropy(logits, targets, self.group).mean()


def llama_pipe_specs(cfg: LlamaConfig, topology: Topology) -> list[LayerSpec]:
    """Layer 0: embedding; layers 1..n: blocks; layer n + 1: norm and head."""
    return ([LayerSpec(EmbeddingPipe, cfg, topology)] + [LayerSpec(BlockPipe, cfg, topology)] * cfg.n_layers
            + [LayerSpec(NormHeadPipe, cfg, topology)])


def pipe_name(name: str, cfg: LlamaConfig) -> str:
    """``Llama`` state-dict name -> the pipeline model's (``layers.3.attn...`` -> ``4.block.attn...``)."""
    head, _, rest = name.partition(".")
    if head == "tok_embeddings":
        return f"0.{name}"
    if head == "layers":
        index, _, tail = rest.partition(".")
        return f"{int(index) + 1}.block.{tail}"
    return f"{cfg.n_layers + 1}.{name}"  # norm.*, output.*


def llama_name(name: str, cfg: LlamaConfig) -> str:
    """Inverse of :func:`pipe_name`."""
    index, _, rest = name.partition(".")
    if index == "0":
        return rest
    if int(index) == cfg.n_layers + 1:
        return rest
    return f"layers.{int(index) - 1}.{rest.removeprefix('block.')}"


def load_plain_weights(model: PipelineModule, cfg: LlamaConfig, plain_state: dict[str, torch.Tensor]) -> None:
    """Give this stage's layers the weights of a single-process ``Llama`` (sliced for this tensor rank)."""
    local = set(model.state_dict())
    mapped = {pipe_name(k, cfg): v for k, v in plain_state.items()}
    load_full_state_dict(model, {k: v for k, v in mapped.items() if k in local}, strict=True)


def stage_full_weights(model: PipelineModule, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """This stage's weights, unsplit and under ``Llama``'s names (collective over the tensor group)."""
    return {llama_name(k, cfg): v for k, v in full_state_dict(model).items()}
