"""Declarative tensor-parallel plans: ``{module-path pattern: style}``, applied by swapping modules in place.

A plan names *what* to split; the layers in ``layers.py`` know *how*. ``apply_plan(model, plan, topology)`` splits a
full model for training, slicing its weights. The built-in plans for Hugging Face models (``plan_for``) are
generated from the architecture table (``architectures.py``) by ``resolve.py``, the same resolver inference auto-TP
and AutoTP training (``autotp.py``) use, so the three agree on every split. Patterns are
dotted module paths where each ``.``-separated atom is an ``fnmatch`` pattern (``layers.*.attn.wqkv``), as torch's
``parallelize_module`` matches them; the first pattern (in plan order) that matches a module decides its style.

Styles (or their string names):

=====================================  =================================================================
``ColwiseParallel()`` / "colwise"      ``nn.Linear`` -> ``ColumnParallelLinear`` (output stays split)
``ColwiseParallel(gather_output=True)`` / "colwise_gather"   ... with the full output gathered
``RowwiseParallel()`` / "rowwise"      ``nn.Linear`` -> ``RowParallelLinear`` (input already split)
``VocabParallel()`` / "vocab"          ``nn.Embedding`` -> ``VocabParallelEmbedding``
``SequenceParallel()`` / "sequence_parallel"  mark the module's weights ``sequence_parallel`` (norms that run
                                       on sequence shards: their gradients are summed over the tensor group)
``LocalHeads(attrs)``                   keep the module, divide its integer attributes ``attrs`` (head
                                       counts, attention widths) by the degree; those it lacks are skipped
``None`` / "replicate"                 leave the module as it is (overrides a later, broader pattern)
=====================================  =================================================================

``grain`` keeps attention heads whole (pass the head size), ``parts`` describes fused projections.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from shardwise.tp import architectures as A
from shardwise.tp.resolve import rule_plan
from shardwise.tp.styles import (
    STYLE_NAMES,
    ColwiseParallel,
    LocalHeads,
    PlanError,
    RowwiseParallel,
    SequenceParallel,
    Style,
    VocabParallel,
    apply_plan,
    describe_plan,
    matches,
    resolve_plan,
)

__all__ = [
    "BUILTIN_PLANS", "STYLE_NAMES", "ColwiseParallel", "LocalHeads", "PlanError", "RowwiseParallel",
    "SequenceParallel", "Style", "VocabParallel", "apply_plan", "describe_plan", "hf_llama_plan", "matches",
    "plan_for", "resolve_plan",
]


def hf_llama_plan(config: Any, *, gather_logits: bool = True) -> dict[str, Style]:
    """Plan for Hugging Face LLaMA-family decoders (Llama, Mistral, Qwen2: separate q/k/v, gate/up/down).

    Heads stay whole (splits fall on key/value groups). The LM head gathers its output (``gather_logits``) so the
    model's own loss and generation see full logits; set it False with a vocabulary-parallel loss.
    """
    return rule_plan(config, gather_logits=gather_logits)


def _trainable(model_type: str) -> bool:
    rule = A.RULES[model_type]
    layouts = {p.layout for p in rule.projections}
    return layouts <= {"heads", "kv", "mlp", "qkv_per_head"} and rule.qkv_layout is None and not rule.alibi(None)


#: Hugging Face ``config.model_type`` -> plan factory: every architecture of the table whose projections are
#: nn.Linear layers split plainly (GPT-2's Conv1D, Falcon's config-dependent fused QKV and ALiBi models excluded)
BUILTIN_PLANS = {model_type: rule_plan for model_type in A.RULES if _trainable(model_type)}


def plan_for(model: nn.Module, **kwargs: Any) -> dict[str, Style]:
    """The built-in plan for a Hugging Face model, chosen by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BUILTIN_PLANS:
        raise PlanError(f"no built-in tensor-parallel plan for model_type {model_type!r} (known: "
                        f"{sorted(BUILTIN_PLANS)}); write one: {{'path.*.pattern': 'colwise' | 'rowwise' | ...}}")
    return BUILTIN_PLANS[model_type](model.config, **kwargs)
