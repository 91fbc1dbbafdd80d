"""Which projections of a Hugging Face model are split, how, and on which grain: the one resolver behind every
tensor-parallel plan of shardwise.

Three users, one answer:

* inference auto-TP (``shardwise/inference/autotp.py``) asks ``table_projections`` (the architecture table);
* AutoTP training (``autotp.py``) asks ``resolve_projections``: the model's own ``config.base_model_tp_plan``
  (transformers >= 4.50) when it has one in styles shardwise maps, else the same table;
* declarative plans (``plans.plan_for`` / ``apply_plan``) are generated from the table by ``rule_plan``.

A projection is ``(module path, style, layout)``: style "column" (output features split) or "row" (input features
split, then all-reduced); layout names what the split dimension holds (``architectures.layout_for``). Splits fall
on key/value groups (``grain``): a rank owns whole key/value heads and the query heads that attend to them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from shardwise.tp import architectures as A
from shardwise.tp.styles import ColwiseParallel, LocalHeads, RowwiseParallel, Style, VocabParallel, matches

#: HF tp_plan styles shardwise maps onto its layers; a plan using any other style is left to the table
HF_STYLES = {"colwise": "column", "rowwise": "row"}
#: head-attribute kinds divided by the degree in a declarative plan (``kv_groups``, a ratio, stays)
DIVIDED_KINDS = ("heads", "kv_heads", "q_width")


class ResolveError(ValueError):
    """The model's tensor-parallel layout cannot be resolved; the message names the model and the fix."""


def head_info(config: Any) -> A.HeadInfo:
    """Attention shape from the table's rule, or from LLaMA-like config names when there is no rule."""
    rule = A.rule_for(config)
    if rule is not None:
        return rule.heads(config)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        raise ResolveError(f"the model's config ({type(config).__name__}) has no num_attention_heads, so "
                           "tensor parallelism cannot keep attention heads whole")
    kv = getattr(config, "num_key_value_heads", None) or heads
    return A.HeadInfo(heads, kv, getattr(config, "head_dim", None) or config.hidden_size // heads, "gqa")


def grain_of(layout: str, info: A.HeadInfo, mlp_grain: int = 1) -> int:
    """Elements per indivisible unit of a split dimension: one key/value group of query heads, one head, ..."""
    d, group = info.head_dim, max(1, info.num_heads // max(1, info.num_kv_heads))
    grains = {"heads": group * d, "kv": d, "mlp": mlp_grain, "qkv_per_head": 3 * d, "qkv_grouped": (group + 2) * d}
    if layout not in grains:
        raise ResolveError(f"layout {layout!r} is not a plain split (it replicates or interleaves parts)")
    return grains[layout]


def table_projections(blocks: int, rule: A.ArchRule, config: Any) -> list[tuple[str, str, str]]:
    """``(path, style, layout)`` of every projection the table names, block by block."""
    qkv = rule.qkv_layout(config) if rule.qkv_layout else None
    return [(f"{rule.blocks}.{i}.{p.path}", p.style, qkv if p.layout == "qkv" else p.layout)
            for i in range(blocks) for p in rule.projections]


def _base_prefix(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + "."
    return ""


def hf_projections(model: nn.Module, config: Any) -> dict[str, str] | None:
    """``{path: style}`` from ``config.base_model_tp_plan`` (patterns relative to the base model), or None when
    the model has none or uses a style shardwise does not map."""
    plan = getattr(config, "base_model_tp_plan", None)
    if not isinstance(plan, Mapping) or not plan or any(str(s) not in HF_STYLES for s in plan.values()):
        return None
    prefix, out = _base_prefix(model), {}
    for path, module in model.named_modules():
        if path.startswith(prefix) and isinstance(module, nn.Linear):
            style = next((HF_STYLES[s] for p, s in plan.items() if matches(p, path[len(prefix):])), None)
            if style is not None:
                out[path] = style
    return out or None


def _layout(path: str, style: str, module: nn.Module, rule: A.ArchRule | None, config: Any,
            info: A.HeadInfo) -> str:
    if rule is not None:
        qkv = rule.qkv_layout(config) if rule.qkv_layout else None
        for p in rule.projections:
            if path.endswith("." + p.path):
                return qkv if p.layout == "qkv" else p.layout
    features = module.out_features if style == "column" else module.in_features
    if features == info.num_heads * info.head_dim:
        return "heads"
    return "kv" if style == "column" and features == info.num_kv_heads * info.head_dim else "mlp"


def resolve_projections(model: nn.Module, config: Any, info: A.HeadInfo) -> tuple[str, list[tuple[str, str, str]]]:
    """(source, ``(path, style, layout)`` list): the HF plan when the model has one, else the table."""
    rule = A.rule_for(config)
    hf = hf_projections(model, config)
    if hf is not None:
        return "hf:base_model_tp_plan", [(p, s, _layout(p, s, model.get_submodule(p), rule, config, info))
                                         for p, s in hf.items()]
    if rule is None:
        raise ResolveError(
            f"model_type {getattr(config, 'model_type', None)!r} has neither a base_model_tp_plan in its config nor "
            f"a tensor-parallel rule (known: {', '.join(A.supported_model_types())}). Fix: set "
            "config.base_model_tp_plan = {'layers.*.self_attn.q_proj': 'colwise', ..., "
            "'layers.*.mlp.down_proj': 'rowwise'}")
    try:
        blocks = len(model.get_submodule(rule.blocks))
    except AttributeError:
        raise ResolveError(f"no decoder blocks at {rule.blocks!r}; this transformers version lays the model out "
                           "differently") from None
    return f"table:{config.model_type}", table_projections(blocks, rule, config)


# -- declarative plans generated from the table -------------------------------------------------------------------
def rule_plan(config: Any, *, gather_logits: bool = True) -> dict[str, Style]:
    """``{pattern: style}`` for ``apply_plan`` from the architecture table (even splits on key/value groups).

    Decoder projections are split; each attention module divides its head counts (``LocalHeads``: transformers
    4.x reshapes with them, 5.x with ``-1``). When the rule names the embedding and LM head (``vocab``), the
    embedding is split along the vocabulary and the LM head gathers its output (``gather_logits``) so the model's
    own loss and generation see full logits; set it False with a vocabulary-parallel loss.
    """
    rule = A.rule_for(config)
    if rule is None:
        raise ResolveError(f"no tensor-parallel rule for model_type {getattr(config, 'model_type', None)!r} "
                           f"(known: {', '.join(A.supported_model_types())})")
    info = rule.heads(config)
    qkv = rule.qkv_layout(config) if rule.qkv_layout else None
    plan: dict[str, Style] = {}
    if rule.vocab is not None:
        plan[rule.vocab[0]] = VocabParallel()
    for p in rule.projections:
        grain = grain_of(qkv if p.layout == "qkv" else p.layout, info)
        style = ColwiseParallel(grain=grain) if p.style == "column" else RowwiseParallel(grain=grain)
        plan[f"{rule.blocks}.*.{p.path}"] = style
    divided = tuple(a for a, kind in rule.head_attrs.items() if kind in DIVIDED_KINDS)
    plan[f"{rule.blocks}.*.{rule.attention}"] = LocalHeads(divided)
    if rule.vocab is not None:
        plan[rule.vocab[1]] = ColwiseParallel(gather_output=gather_logits)
    return plan
