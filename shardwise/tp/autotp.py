"""AutoTP training: split an unmodified Hugging Face model over a tensor-parallel group, in place.

``tp_model_init(model, tp_size, dtype)`` (DeepSpeed's public function) and ``initialize`` with
``"tensor_parallel": {"autotp_size": N}`` both end here. Two steps, every error before any module is changed:

1. ``plan_training(model, tp)`` decides, from the config and module shapes alone, which Linear layers become
   ``ColumnParallelLinear`` (q/k/v, gate/up, fused QKV: output features split) and which ``RowParallelLinear``
   (attention output, MLP down: input features split, then all-reduced), and the per-rank head counts the
   attention modules must hold. Which modules and which style: the model's own ``config.base_model_tp_plan``
   (recent transformers releases) when it has one, else the architecture table of ``architectures.py`` (shared with
   inference auto-TP). How each dimension is cut: by key/value groups (a rank owns whole key/value heads and the
   query heads that attend to them), so the split may be uneven (5 KV heads on 2 ranks: 3 + 2) but never cuts a
   head or separates a query head from its key/value head.
2. ``apply_training_plan(model, plan, group)`` swaps the modules for the ``shardwise.tp`` layers (slicing the
   existing weights; every rank must hold the same full weights, as after the same seed or ``from_pretrained``)
   and sets the attention modules' head attributes.

An untied LM head is split too, by vocabulary (a column-parallel layer whose output slices are all-gathered into
the full logits the model's own loss reads, as HF's ``colwise_rep`` style): at a 32K vocabulary it is a large share
of a small model's matmuls, which every rank would otherwise repeat. A head tied to the input embedding stays
whole with it. The embedding and the norms stay replicated: their gradients are equal on every tensor rank (the
column-parallel layers all-reduce their input gradients), and the engine counts them once in the gradient norm
(split weights carry ``tensor_model_parallel``). ``full_state_dict`` of ``state.py`` gathers the full HF state dict.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardwise.comm.topology import Topology
from shardwise.common.logging import log_dist
from shardwise.tp import architectures as A
from shardwise.tp.layers import ColumnParallelLinear, RowParallelLinear
from shardwise.tp.partition import partition_sizes
from shardwise.tp.resolve import ResolveError, grain_of, head_info, resolve_projections

#: attention attributes of a model without a table entry (LLaMA-like naming)
DEFAULT_HEAD_ATTRS = {"num_heads": "heads", "num_key_value_heads": "kv_heads", "num_key_value_groups": "kv_groups"}
#: layouts training can split (a fused multi-query QKV replicates K/V, and a Conv1D stores its weight transposed)
TRAINABLE_LAYOUTS = ("heads", "kv", "mlp", "qkv_per_head", "qkv_grouped")


class AutoTPTrainingError(ValueError):
    """The model cannot be trained with AutoTP as asked; the message names the numbers and the fix."""


@dataclass(frozen=True)
class SplitProj:
    """One Linear to replace: its module path, style ("column" | "row" | "vocab": column-split, output gathered)
    and the grain its split falls on."""

    path: str
    style: str
    grain: int
    layout: str


@dataclass
class TrainingPlan:
    """What ``apply_training_plan`` will do to a model over ``tp`` ranks."""

    tp: int
    model_name: str
    source: str  # "hf:base_model_tp_plan" | "table:<model_type>"
    info: A.HeadInfo
    projections: list[SplitProj] = field(default_factory=list)
    #: attention module path -> {attribute: kind} to set per rank (see ``architectures.attr_value`` kinds)
    attention: dict[str, dict[str, str]] = field(default_factory=dict)
    fixups: list[tuple[str, str, Any]] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.info.num_heads // self.info.num_kv_heads

    def kv_heads(self, rank: int) -> int:
        """Key/value heads owned by ``rank`` (the first ranks own one more when they do not divide)."""
        return partition_sizes(self.info.num_kv_heads, self.tp)[rank]

    def attr_value(self, kind: str, rank: int) -> int:
        """The per-rank value of a head attribute of ``kind``."""
        kv = self.kv_heads(rank)
        values = {"heads": kv * self.group_size, "kv_heads": kv, "kv_groups": self.group_size,
                  "q_width": kv * self.group_size * self.info.head_dim}
        if kind not in values:
            raise AutoTPTrainingError(f"unknown head attribute kind {kind!r}")
        return values[kind]

    def summary(self) -> str:
        """One line for the log."""
        cols = sum(p.style == "column" for p in self.projections)
        rows = sum(p.style == "row" for p in self.projections)
        heads = [p.path for p in self.projections if p.style == "vocab"]
        per_rank = [self.kv_heads(r) * self.group_size for r in range(self.tp)]
        head = f"LM head {heads[0]} split by vocabulary" if heads else "LM head replicated"
        return (f"{self.model_name}: AutoTP training tp={self.tp} ({self.source}), {cols} column + {rows} "
                f"row-parallel projections, {head}, query heads per rank {per_rank}")


# -- planning -----------------------------------------------------------------------------------------------------
def _model_name(model: nn.Module) -> str:
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return f"{path} ({type(model).__name__})" if path else type(model).__name__


def check_heads(info: A.HeadInfo, tp: int, name: str) -> None:
    """Refuse a degree that would cut a key/value head or separate it from its query heads."""
    kv = 1 if info.kv_mode == "mqa" else info.num_kv_heads
    if info.num_heads % kv:
        raise AutoTPTrainingError(f"{name}: {info.num_heads} attention heads do not group evenly over {kv} key/value "
                                  "heads; the config is inconsistent")
    if kv < tp:
        raise AutoTPTrainingError(
            f"{name}: {info.num_heads} attention heads sharing {kv} key/value head(s) cannot be split over "
            f"tensor_parallel.autotp_size={tp} ranks for training: each rank must own whole key/value heads and the "
            "query heads attending to them (uneven counts are fine, fewer key/value heads than ranks is not). "
            f"Fix: set autotp_size to a value from 1 to {kv}, and use the other ranks for data parallelism (ZeRO)")


def plan_training(model: nn.Module, tp: int, *, mlp_grain: int = 1) -> TrainingPlan:
    """Decide how to split ``model`` over ``tp`` ranks for training; raises ``AutoTPTrainingError`` first."""
    name = _model_name(model)
    config = getattr(model, "config", None)
    if config is None:
        raise AutoTPTrainingError(f"{name} has no Hugging Face config; AutoTP training splits Hugging Face models. "
                                  "For other models, apply a shardwise.tp plan (shardwise.tp.apply_plan) and pass "
                                  "mpu=shardwise.tp.ModelParallelUnit(topology) to initialize")
    rule = A.rule_for(config)
    try:
        info = head_info(config)
    except ResolveError as exc:
        raise AutoTPTrainingError(f"{name}: {exc}") from None
    plan = TrainingPlan(tp, name, "none", info)
    if tp == 1:
        return plan
    check_heads(info, tp, name)
    if rule is not None and rule.alibi(config):
        raise AutoTPTrainingError(f"{name}: model_type {config.model_type!r} uses ALiBi position biases computed for "
                                  "all heads, which AutoTP training does not cut per rank yet; use "
                                  "autotp_size=1 with ZeRO, or inference auto-TP")
    try:
        plan.source, chosen = resolve_projections(model, config, info)
    except ResolveError as exc:
        raise AutoTPTrainingError(f"{name}: {exc}, or train it with ZeRO only") from None
    for path, style, layout in chosen:
        plan.projections.append(_plan_proj(model, plan, path, style, layout, mlp_grain))
    head = _untied_lm_head(model, tp)
    if head is not None:
        plan.projections.append(SplitProj(head, "vocab", 1, "vocab"))
    _plan_attention(model, plan, rule, config)
    return plan


def _untied_lm_head(model: nn.Module, tp: int) -> str | None:
    """The module path of ``model``'s LM head when it can be split by vocabulary: an ``nn.Linear`` output
    embedding whose weight is not the input embedding's (a tied head stays whole with the embedding)."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    if not callable(get_out) or not callable(get_in):
        return None
    head, embedding = get_out(), get_in()
    if type(head) is not nn.Linear or head.out_features < tp:
        return None
    if embedding is not None and getattr(embedding, "weight", None) is head.weight:
        return None
    return next((path for path, module in model.named_modules() if module is head), None)


def _plan_proj(model: nn.Module, plan: TrainingPlan, path: str, style: str, layout: str,
               mlp_grain: int) -> SplitProj:
    module = model.get_submodule(path)
    if not isinstance(module, nn.Linear):
        raise AutoTPTrainingError(f"{plan.model_name}: {path} is a {type(module).__name__}, not an nn.Linear; "
                                  "AutoTP training splits Linear layers only (GPT-2's Conv1D is not supported)")
    if layout not in TRAINABLE_LAYOUTS:
        raise AutoTPTrainingError(f"{plan.model_name}: {path} has the fused layout {layout!r}, which AutoTP "
                                  f"training cannot split (it supports {', '.join(TRAINABLE_LAYOUTS)})")
    grain = grain_of(layout, plan.info, mlp_grain)
    features = module.out_features if style == "column" else module.in_features
    if features % grain or features // grain < plan.tp:
        side = "output" if style == "column" else "input"
        raise AutoTPTrainingError(f"{plan.model_name}: {path} has {features} {side}"
                                  f" features, which do not split into {plan.tp} pieces of whole {grain}-element "
                                  "grains; the config's head counts do not match the weights, or "
                                  "tensor_parallel.tp.tp_grain_size is too large")
    return SplitProj(path, style, grain, layout)


def _plan_attention(model: nn.Module, plan: TrainingPlan, rule: A.ArchRule | None, config: Any) -> None:
    """Every module holding split query projections is an attention module: its head counts become per-rank."""
    attrs = dict(rule.head_attrs) if rule is not None else dict(DEFAULT_HEAD_ATTRS)
    paths = sorted({p.path.rpartition(".")[0] for p in plan.projections if p.style == "column" and
                    p.layout in ("heads", "qkv_per_head", "qkv_grouped")})
    for path in paths:
        module = model.get_submodule(path)
        held = {a: v for a, v in vars(module).items() if isinstance(v, int) and not isinstance(v, bool)}
        unknown = sorted(a for a in A.GUARDED_ATTRS if a in held and a not in attrs)
        if unknown:
            raise AutoTPTrainingError(
                f"{plan.model_name}: {path} holds {', '.join(f'{a}={held[a]}' for a in unknown)}, which AutoTP does "
                "not know how to divide for this model; this transformers release is not supported by AutoTP")
        plan.attention[path] = {a: kind for a, kind in attrs.items() if a in held}
    if rule is not None:
        blocks = model.get_submodule(rule.blocks)
        for i, block in enumerate(blocks):
            for rel, values in rule.fixups.items():
                sub = block.get_submodule(rel) if rel else block
                plan.fixups += [(f"{rule.blocks}.{i}.{rel}", a, v) for a, v in values.items() if hasattr(sub, a)]


# -- applying -----------------------------------------------------------------------------------------------------
def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def apply_training_plan(model: nn.Module, plan: TrainingPlan, group: Any) -> nn.Module:
    """Swap the planned Linear layers for tensor-parallel ones (slicing their weights) and set head counts."""
    if plan.tp == 1:
        return model
    rank = group.rank
    for p in plan.projections:
        old = model.get_submodule(p.path)
        if p.style == "column":
            new = ColumnParallelLinear.from_linear(old, group, grain=p.grain)
        elif p.style == "vocab":
            new = ColumnParallelLinear.from_linear(old, group, grain=p.grain, gather_output=True)
        else:
            new = RowParallelLinear.from_linear(old, group, grain=p.grain)
        _keep_parameter_objects(old, new)
        _replace(model, p.path, new)
    for path, attrs in plan.attention.items():
        module = model.get_submodule(path)
        for attr, kind in attrs.items():
            setattr(module, attr, plan.attr_value(kind, rank))
    for path, attr, value in plan.fixups:
        setattr(model.get_submodule(path), attr, value)
    return model


def _keep_parameter_objects(old: nn.Module, new: nn.Module) -> None:
    """Give the split layer the original ``Parameter`` objects, holding their slices (DeepSpeed's AutoTP swaps
    ``param.data`` in place): an optimizer or parameter list made before the split (Accelerate's usual loop builds
    ``AdamW(model.parameters())`` before ``prepare``) then still refers to the parameters that train."""
    for name in ("weight", "bias"):
        original, split = getattr(old, name, None), getattr(new, name, None)
        if not isinstance(original, nn.Parameter) or not isinstance(split, nn.Parameter):
            continue
        original.data = split.data
        for attr, value in vars(split).items():  # tensor_model_parallel, partition_dim, ...
            setattr(original, attr, value)
        setattr(new, name, original)


# -- the public entry points --------------------------------------------------------------------------------------
_APPLIED: weakref.WeakKeyDictionary[nn.Module, Topology] = weakref.WeakKeyDictionary()


def applied_topology(model: nn.Module) -> Topology | None:
    """The topology ``tp_model_init`` split ``model`` over, or None when it was not split by AutoTP."""
    return _APPLIED.get(model)


def autotp_split(model: nn.Module, topology: Topology, *, mlp_grain: int = 1) -> TrainingPlan:
    """Plan and apply AutoTP over ``topology``'s tensor group; remember the topology for ``initialize``."""
    if model in _APPLIED:
        raise AutoTPTrainingError("this model was already split by AutoTP; pass it to initialize() as it is")
    plan = plan_training(model, topology.size("tp"), mlp_grain=mlp_grain)
    apply_training_plan(model, plan, topology.tp_group)
    _APPLIED[model] = topology
    log_dist(plan.summary(), ranks=[0])
    return plan


def tp_model_init(model: nn.Module, tp_size: int, dtype: torch.dtype | None = None, config: Any = None,
                  **kwargs: Any) -> nn.Module:
    """DeepSpeed's ``tp_model_init``: split ``model`` over ``tp_size`` tensor-parallel ranks (the rest of the job
    is data parallel), converted to ``dtype``; pass the result to ``initialize`` with a config whose
    ``tensor_parallel.autotp_size`` is absent or equal to ``tp_size``. Starts torch.distributed if needed."""
    from shardwise import comm

    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise AutoTPTrainingError(f"tp_model_init(tp_size={tp_size!r}): expected a positive integer")
    comm.init_distributed()
    if dtype is not None:
        model.to(dtype)
    grain = 1
    if isinstance(config, Mapping):
        grain = int(((config.get("tensor_parallel") or {}).get("tp") or {}).get("tp_grain_size", 1) or 1)
    autotp_split(model, Topology(tp=tp_size), mlp_grain=grain)
    return model
