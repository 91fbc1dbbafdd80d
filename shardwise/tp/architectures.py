"""What automatic tensor parallelism knows about each Hugging Face architecture, as data.

For every supported ``config.model_type`` an ``ArchRule`` names where the decoder blocks are, which projections of
a block are split by output features (column: q/k/v/up/gate and fused QKV) or by input features (row: the
attention output and the MLP down projection, followed by an all-reduce), how a fused projection is laid out, and
which attributes of the attention module count heads (they are divided so the module reshapes its local
activations correctly). Both auto-TP users read these rules: inference (``shardwise/inference/autotp.py``) and
AutoTP training (``shardwise/tp/autotp.py``); nothing here touches a model.

Fused layouts (output dimension of the QKV projection):

==================  ===============================================  ======================================
``qkv_parts``       ``[Q | K | V]``, each ``H*d`` (GPT-2 ``c_attn``)  each part split by heads
``qkv_per_head``    ``[H, 3, d]`` interleaved per head (BLOOM,        contiguous chunks of whole heads
                    GPT-NeoX, Falcon without MQA/GQA)                 (grain ``3*d``)
``qkv_grouped``     ``[KV, H/KV + 2, d]`` per KV group (Falcon new    contiguous chunks of whole groups
                    decoder architecture)
``qkv_mqa``         ``[H*d | d | d]`` (Falcon multi-query)            queries split, the K and V heads
                                                                      replicated on every rank
==================  ===============================================  ======================================

Tested against the oldest and the newest transformers the project supports (see the README's test section). The
attention modules of those releases keep their head counts in different attributes (transformers 4.45's
``LlamaSdpaAttention`` reshapes with ``num_heads`` and ``num_key_value_heads``; 5.x's ``LlamaAttention`` only
keeps ``num_key_value_groups``; 5.x's ``FalconAttention`` added ``num_key_value_groups``, which multi-query
attention uses to repeat its one key/value head). So ``head_attrs`` lists every head-count or attention-width
attribute an architecture has had, and ``autotp`` divides those the installed module has. ``GUARDED_ATTRS`` names
the attributes that always count heads or widths wherever they appear: an attention module holding one that its
rule does not list is refused (a new transformers layout is an error, never a silent wrong split), and every
projection's shape is checked against its layout before use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shardwise.tp import layouts as L


@dataclass(frozen=True)
class HeadInfo:
    """Attention shape of a model: query heads, key/value heads, head size and how K/V are laid out."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: "same" (KV heads = query heads), "gqa" (separate K/V projections), "grouped" (fused per KV group),
    #: "mqa" (one shared K/V head)
    kv_mode: str = "same"

    def valid_degrees(self) -> list[int]:
        """Tensor-parallel degrees that keep every head whole."""
        return L.valid_degrees(self.num_heads, self.num_kv_heads, self.kv_mode)

    def local_heads(self, tp: int) -> int:
        """Query heads per rank."""
        return self.num_heads // tp

    def local_kv_heads(self, tp: int) -> int:
        """Key/value heads per rank, as the attention module must see them."""
        if self.kv_mode == "mqa":
            return 1
        if self.kv_mode == "gqa":
            return L.local_kv_heads(self.num_kv_heads, tp)
        return self.num_kv_heads // tp


@dataclass(frozen=True)
class Proj:
    """One projection of a block: its path inside the block, its style and the layout of its split dimension."""

    path: str
    style: str  # "column" (split output features) | "row" (split input features, then all-reduce)
    layout: str  # "heads" | "kv" | "mlp" | "qkv_parts" | "qkv_per_head" | "qkv_grouped" | "qkv_mqa"


@dataclass(frozen=True)
class ArchRule:
    """Tensor-parallel rules of one architecture family."""

    blocks: str  # path of the ModuleList of decoder blocks
    attention: str  # path of the attention module inside a block
    projections: tuple[Proj, ...]
    heads: Callable[[Any], HeadInfo]
    #: attention attribute -> what it holds: "heads" | "kv_heads" | "q_width" | "kv_groups" (divided per rank).
    #: Every such attribute of any supported transformers release; those the installed module has are divided.
    head_attrs: Mapping[str, str] = field(default_factory=dict)
    #: block-relative module path -> attributes to set after splitting (e.g. BLOOM's pretraining_tp = 1)
    fixups: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: whether the model passes per-head position biases (ALiBi) computed for all heads into each attention call
    alibi: Callable[[Any], bool] = lambda config: False
    #: the projection layout of a fused QKV may depend on the config (Falcon)
    qkv_layout: Callable[[Any], str] | None = None
    #: (embedding path, LM head path) that declarative plans split along the vocabulary; None: kept whole
    vocab: tuple[str, str] | None = None


#: attribute names that count heads or hold an attention width in every architecture that has them: an attention
#: module with one of these that its rule's ``head_attrs`` does not list is refused (its meaning is unknown)
GUARDED_ATTRS = ("num_heads", "n_heads", "n_head", "num_attention_heads", "num_key_value_heads", "num_kv_heads",
                 "n_kv_heads", "num_key_value_groups", "split_size", "all_head_size", "inner_dim", "embed_dim",
                 "hidden_size")


def layout_for(proj: Proj, info: HeadInfo, features: int, tp: int, qkv_layout: str | None = None) -> L.ShardLayout:
    """The layout of ``proj``'s split dimension (``features`` elements) over ``tp`` ranks."""
    kind = qkv_layout if proj.layout == "qkv" else proj.layout
    h, kv, d = info.num_heads, info.num_kv_heads, info.head_dim
    if kind == "mlp":
        return L.even(features, tp)
    if kind == "heads":
        return L.even(features, tp, d)
    if kind == "kv":
        return L.kv_heads(kv, d, tp)
    if kind == "qkv_parts":
        third = features // 3
        return L.even(features, tp, d, parts=(third, third, third))
    if kind == "qkv_per_head":
        return L.even(features, tp, 3 * d)
    if kind == "qkv_grouped":
        return L.even(features, tp, (h // kv + 2) * d)
    if kind == "qkv_mqa":
        return L.split_with_replicated(h * d, (d, d), tp, d)
    raise ValueError(f"unknown projection layout {kind!r}")


def expected_features(proj: Proj, info: HeadInfo, qkv_layout: str | None = None) -> int | None:
    """Size the split dimension must have for the layout (None: any size, e.g. the MLP width)."""
    kind = qkv_layout if proj.layout == "qkv" else proj.layout
    h, kv, d = info.num_heads, info.num_kv_heads, info.head_dim
    return {
        "heads": h * d, "kv": kv * d, "qkv_parts": 3 * h * d, "qkv_per_head": 3 * h * d,
        "qkv_grouped": (h + 2 * kv) * d, "qkv_mqa": (h + 2) * d,
    }.get(kind)


# -- head shapes per family ---------------------------------------------------------------------------------------
def _head_dim(config: Any, hidden: int, heads: int) -> int:
    return getattr(config, "head_dim", None) or hidden // heads


def _llama_heads(c: Any) -> HeadInfo:
    h = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or h
    return HeadInfo(h, kv, _head_dim(c, c.hidden_size, h), "gqa")


def _gpt2_heads(c: Any) -> HeadInfo:
    return HeadInfo(c.n_head, c.n_head, c.n_embd // c.n_head)


def _bloom_heads(c: Any) -> HeadInfo:
    return HeadInfo(c.n_head, c.n_head, c.hidden_size // c.n_head)


def _plain_heads(c: Any) -> HeadInfo:
    h = c.num_attention_heads
    return HeadInfo(h, h, c.hidden_size // h)


def _falcon_heads(c: Any) -> HeadInfo:
    h, d = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    if c.new_decoder_architecture:
        return HeadInfo(h, c.num_kv_heads, d, "grouped")
    if c.multi_query:
        return HeadInfo(h, 1, d, "mqa")
    return HeadInfo(h, h, d)


def _falcon_qkv(c: Any) -> str:
    if c.new_decoder_architecture:
        return "qkv_grouped"
    return "qkv_mqa" if c.multi_query else "qkv_per_head"


def _mlp(up: str, down: str, *gates: str) -> tuple[Proj, ...]:
    return (*(Proj(g, "column", "mlp") for g in gates), Proj(up, "column", "mlp"), Proj(down, "row", "mlp"))


_LLAMA = ArchRule(
    blocks="model.layers", attention="self_attn",
    projections=(Proj("self_attn.q_proj", "column", "heads"), Proj("self_attn.k_proj", "column", "kv"),
                 Proj("self_attn.v_proj", "column", "kv"), Proj("self_attn.o_proj", "row", "heads"),
                 *_mlp("mlp.up_proj", "mlp.down_proj", "mlp.gate_proj")),
    heads=_llama_heads,
    # 4.45 reshapes with num_heads / num_key_value_heads (Qwen2 with hidden_size); 5.x keeps only the groups
    head_attrs={"num_heads": "heads", "num_key_value_heads": "kv_heads", "num_key_value_groups": "kv_groups",
                "hidden_size": "q_width"},
    vocab=("model.embed_tokens", "lm_head"),
)

RULES: dict[str, ArchRule] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": ArchRule(
        blocks="transformer.h", attention="attn",
        projections=(Proj("attn.c_attn", "column", "qkv_parts"), Proj("attn.c_proj", "row", "heads"),
                     *_mlp("mlp.c_fc", "mlp.c_proj")),
        heads=_gpt2_heads, head_attrs={"num_heads": "heads", "split_size": "q_width", "embed_dim": "q_width"},
    ),
    "bloom": ArchRule(
        blocks="transformer.h", attention="self_attention",
        projections=(Proj("self_attention.query_key_value", "column", "qkv_per_head"),
                     Proj("self_attention.dense", "row", "heads"),
                     *_mlp("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
        heads=_bloom_heads, head_attrs={"num_heads": "heads", "hidden_size": "q_width", "split_size": "q_width"},
        # pretraining_tp > 1 with slow_but_exact multiplies slices of dense.weight directly, bypassing the layer
        fixups={"self_attention": {"pretraining_tp": 1}, "mlp": {"pretraining_tp": 1}},
        alibi=lambda c: True,
    ),
    "opt": ArchRule(
        blocks="model.decoder.layers", attention="self_attn",
        projections=(Proj("self_attn.q_proj", "column", "heads"), Proj("self_attn.k_proj", "column", "heads"),
                     Proj("self_attn.v_proj", "column", "heads"), Proj("self_attn.out_proj", "row", "heads"),
                     *_mlp("fc1", "fc2")),
        heads=_plain_heads, head_attrs={"num_heads": "heads", "embed_dim": "q_width"},
    ),
    "falcon": ArchRule(
        blocks="transformer.h", attention="self_attention",
        projections=(Proj("self_attention.query_key_value", "column", "qkv"),
                     Proj("self_attention.dense", "row", "heads"),
                     *_mlp("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
        heads=_falcon_heads,
        # 5.x repeats the key/value heads num_key_value_groups times (one shared head with multi_query): it must
        # be the local query heads per local key/value head, or the repeated keys outnumber the queries
        head_attrs={"num_heads": "heads", "num_kv_heads": "kv_heads", "num_key_value_groups": "kv_groups",
                    "hidden_size": "q_width", "split_size": "q_width"},
        alibi=lambda c: bool(getattr(c, "alibi", False)), qkv_layout=_falcon_qkv,
    ),
    "gpt_neox": ArchRule(
        blocks="gpt_neox.layers", attention="attention",
        projections=(Proj("attention.query_key_value", "column", "qkv_per_head"),
                     Proj("attention.dense", "row", "heads"),
                     *_mlp("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
        heads=_plain_heads, head_attrs={"num_attention_heads": "heads", "hidden_size": "q_width"},
    ),
    "gptj": ArchRule(
        blocks="transformer.h", attention="attn",
        projections=(Proj("attn.q_proj", "column", "heads"), Proj("attn.k_proj", "column", "heads"),
                     Proj("attn.v_proj", "column", "heads"), Proj("attn.out_proj", "row", "heads"),
                     *_mlp("mlp.fc_in", "mlp.fc_out")),
        heads=lambda c: HeadInfo(c.n_head, c.n_head, c.n_embd // c.n_head),
        head_attrs={"num_attention_heads": "heads", "embed_dim": "q_width"},
    ),
}


def attr_value(kind: str, info: HeadInfo, tp: int) -> int:
    """The per-rank value of a head-count attribute of kind ``kind``."""
    if kind == "heads":
        return info.local_heads(tp)
    if kind == "kv_heads":
        return info.local_kv_heads(tp)
    if kind == "q_width":
        return info.local_heads(tp) * info.head_dim
    if kind == "kv_groups":
        return info.local_heads(tp) // info.local_kv_heads(tp)
    raise ValueError(f"unknown head attribute kind {kind!r}")


def rule_for(config: Any) -> ArchRule | None:
    """The rule for a Hugging Face config's ``model_type``, or None when the architecture is not known."""
    return RULES.get(getattr(config, "model_type", None))


def supported_model_types() -> list[str]:
    """Every ``model_type`` automatic tensor parallelism supports."""
    return sorted(RULES)
