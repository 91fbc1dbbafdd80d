"""Automatic tensor parallelism for inference: plan the split of a (meta or real) model, then apply it.

Two steps, so that every error comes before any weight is read:

1. ``plan_tensor_parallel(model, tp, ...)`` only looks at module types and shapes (a meta model is enough). It
   finds each decoder block's attention and MLP projections from the architecture's rule (``tp/architectures.py``)
   or a user ``injection_policy``, checks that the heads divide (the error names the model, the head count and
   the valid degrees), checks every projection's shape against its layout, and decides whether the embedding and
   LM head are split along the vocabulary (by size; see ``VOCAB_SPLIT_MIN_ELEMENTS``).
2. ``apply_tensor_parallel(model, plan, group)`` swaps each projection for a layer of ``shardwise.tp`` built on
   the meta device (``ColumnParallelLinear`` for q/k/v/up/gate and fused QKV, ``RowParallelLinear`` followed by its
   all-reduce for o/down, ``VocabParallelEmbedding`` and a gathering ``ColumnParallelLinear`` for the vocabulary),
   divides the head-count attributes of each attention module, and returns where each full tensor's slices go
   (``TensorShard``), for ``loader.py`` to fill.

Manual policies follow DeepSpeed's ``injection_policy={BlockClass: ("attn.out_proj", "mlp.fc2")}``: the named
Linear layers of each such block are split by input features (row), every other Linear of the block by output
features (column), and integer attributes named like head counts (``HEAD_ATTR_NAMES``) or attention widths
(``WIDTH_ATTR_NAMES``) on the block's modules are divided by the degree. Such a model's attention must reshape
with those attributes or with ``-1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shardwise.inference.layers import (
    InferenceColumnParallelLinear,
    InferenceGatherLinear,
    InferenceRowParallelLinear,
    InferenceVocabParallelEmbedding,
)
from shardwise.inference.loader import LoadTargets, TensorShard
from shardwise.tp import architectures as A
from shardwise.tp import layouts as L
from shardwise.tp.partition import DimSplit
from shardwise.tp.resolve import table_projections

#: integer attributes divided by the degree in blocks named by an ``injection_policy``
HEAD_ATTR_NAMES = ("num_heads", "n_heads", "n_head", "num_attention_heads", "num_key_value_heads", "num_kv_heads",
                   "n_kv_heads")
WIDTH_ATTR_NAMES = ("all_head_size", "inner_dim", "split_size")
#: Linear names that usually are a block's output projections (used to suggest an injection_policy)
OUTPUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "down_proj", "fc2", "fc_out", "dense_4h_to_h", "wo", "w2",
                "out", "down")
#: the embedding and LM head are split along the vocabulary when their table has at least this many elements
#: (4M: 16 MB in fp32). Below it, replication costs little memory and saves a collective per forward.
VOCAB_SPLIT_MIN_ELEMENTS = 1 << 22


class AutoTPError(ValueError):
    """The model cannot be split as asked; the message names the model, the numbers and the fix."""


@dataclass
class PlannedProj:
    """One projection to replace: its module path, style and the layout of the split dimension."""

    path: str
    style: str  # "column" | "row"
    layout: L.ShardLayout


@dataclass
class TPPlan:
    """Everything ``apply_tensor_parallel`` will do, decided from shapes alone."""

    tp: int
    model_name: str
    source: str  # "auto:<model_type>" | "injection_policy" | "none"
    projections: list[PlannedProj] = field(default_factory=list)
    attrs: list[tuple[str, str, Any]] = field(default_factory=list)  # (module path, attribute, new value)
    head_hooks: list[tuple[str, int]] = field(default_factory=list)  # (attention path, total heads)
    vocab: list[tuple[str, str]] = field(default_factory=list)  # (module path, "embedding" | "head")
    tied: list[list[str]] = field(default_factory=list)
    info: A.HeadInfo | None = None

    def summary(self) -> str:
        """One line for the log."""
        cols = sum(p.style == "column" for p in self.projections)
        rows = len(self.projections) - cols
        vocab = ", ".join(f"{k} {p}" for p, k in self.vocab) or "replicated"
        heads = f", heads {self.info.num_heads}/kv {self.info.num_kv_heads} -> {self.info.local_heads(self.tp)}" \
                f"/{self.info.local_kv_heads(self.tp)} per rank" if self.info and self.tp > 1 else ""
        return (f"{self.model_name}: tp={self.tp} ({self.source}), {cols} column + {rows} row-parallel "
                f"projections{heads}; vocabulary: {vocab}")


# -- helpers ------------------------------------------------------------------------------------------------------
def model_name(model: nn.Module) -> str:
    """``name_or_path (Class)`` for messages."""
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return f"{path} ({type(model).__name__})" if path else type(model).__name__


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _features(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a GPT-2 Conv1D (whose weight is stored [in, out])."""
    if _is_conv1d(m):
        return int(m.weight.shape[0]), int(m.weight.shape[1])
    return m.in_features, m.out_features


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of parameters shared by several modules (a tied LM head), each group in module order."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def tie_declared_weights(model: nn.Module) -> None:
    """Tie what a Hugging Face model's config ties (the LM head to the embedding), as its constructor does for a
    real model: transformers 5.0 builds a meta model with the two untied, and a checkpoint saved tied holds only
    the embedding. Call before planning (``tied_groups`` reads the ties)."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie) and getattr(model, "config", None) is not None:
        tie()


def _module_path(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


# -- planning -----------------------------------------------------------------------------------------------------
def plan_tensor_parallel(model: nn.Module, tp: int, *, injection_policy: Mapping | None = None,
                         vocab_parallel: bool | str = "auto") -> TPPlan:
    """Decide how to split ``model`` over ``tp`` ranks; raises ``AutoTPError`` before anything is changed."""
    name = model_name(model)
    plan = TPPlan(tp, name, "none", tied=tied_groups(model))
    if tp == 1:
        return plan
    if injection_policy:
        _plan_manual(model, plan, injection_policy)
    else:
        config = getattr(model, "config", None)
        rule = A.rule_for(config)
        if rule is None:
            raise AutoTPError(_unknown_message(model, name, tp))
        _plan_rule(model, plan, rule, config)
    _plan_vocab(model, plan, vocab_parallel)
    return plan


def _indivisible(name: str, what: str, count: int, tp: int, valid: list[int]) -> AutoTPError:
    return AutoTPError(f"{name}: {count} {what} cannot be split evenly over tensor_parallel.tp_size={tp} ranks. "
                       f"Valid tp_size values for this model: {', '.join(map(str, valid))}. Fix: launch with one of "
                       "those degrees (or tp_size=1 to run it unsplit on each rank).")


def _plan_rule(model: nn.Module, plan: TPPlan, rule: A.ArchRule, config: Any) -> None:
    tp = plan.tp
    info = rule.heads(config)
    plan.info, plan.source = info, f"auto:{config.model_type}"
    valid = info.valid_degrees()
    if tp not in valid:
        what = "attention heads" if info.kv_mode in ("same", "mqa") or info.num_heads % tp else \
            f"attention heads with {info.num_kv_heads} key/value heads"
        raise _indivisible(plan.model_name, what, info.num_heads, tp, valid)
    try:
        blocks = model.get_submodule(rule.blocks)
    except AttributeError:
        raise AutoTPError(f"{plan.model_name}: no decoder blocks at {rule.blocks!r}; this transformers version lays "
                          "the model out differently; pass an injection_policy") from None
    # the shared resolver (shardwise/tp/resolve.py) names every projection, its style and resolved layout
    for path, style, layout in table_projections(len(blocks), rule, config):
        plan.projections.append(_plan_proj(plan, model, A.Proj(path, style, layout), info))
    for i, block in enumerate(blocks):
        prefix = f"{rule.blocks}.{i}"
        _plan_head_attrs(plan, block.get_submodule(rule.attention), f"{prefix}.{rule.attention}", rule, config)
        for rel, values in rule.fixups.items():
            sub = block.get_submodule(rel) if rel else block
            plan.attrs += [(f"{prefix}.{rel}", a, v) for a, v in values.items() if hasattr(sub, a)]
        if rule.alibi(config):
            plan.head_hooks.append((f"{prefix}.{rule.attention}", info.num_heads))


def _plan_head_attrs(plan: TPPlan, attention: nn.Module, path: str, rule: A.ArchRule, config: Any) -> None:
    """Divide the head counts and widths the attention module holds (which ones depends on the transformers
    release: ``rule.head_attrs`` lists all of them); refuse a module holding a head attribute the rule does not know
    (``A.GUARDED_ATTRS``), since leaving it whole would reshape the local activations wrongly."""
    held = {a: v for a, v in vars(attention).items() if isinstance(v, int) and not isinstance(v, bool)}
    unknown = sorted(a for a in A.GUARDED_ATTRS if a in held and a not in rule.head_attrs)
    if unknown:
        raise AutoTPError(f"{plan.model_name}: {path} holds {', '.join(f'{a}={held[a]}' for a in unknown)}, which "
                          f"the auto-TP rule for model_type {config.model_type!r} does not know how to divide; this "
                          "transformers release is not supported by auto-TP. Fix: pass an injection_policy, or "
                          "install a transformers release in the range the README lists")
    # none held is fine: such a module (GPT-NeoX in 5.x) reshapes with -1 and its head size
    plan.attrs += [(path, a, A.attr_value(kind, plan.info, plan.tp)) for a, kind in rule.head_attrs.items()
                   if a in held]


def _plan_proj(plan: TPPlan, model: nn.Module, proj: A.Proj, info: A.HeadInfo) -> PlannedProj:
    path = proj.path
    try:
        m = model.get_submodule(path)
    except AttributeError:
        m = None
    if m is None or not _is_linear(m):
        raise AutoTPError(f"{plan.model_name}: expected a Linear at {path}, found {type(m).__name__}; this "
                          "transformers version is not supported by auto-TP: pass an injection_policy")
    in_f, out_f = _features(m)
    features = out_f if proj.style == "column" else in_f
    expected = A.expected_features(proj, info)
    if expected is not None and features != expected:
        raise AutoTPError(f"{plan.model_name}: {path} has {features} features, but {info.num_heads} heads of "
                          f"{info.head_dim} ({info.num_kv_heads} key/value heads) need {expected}; the config does not "
                          "match the weights' layout")
    return PlannedProj(path, proj.style, A.layout_for(proj, info, features, plan.tp))


def _policy_classes(model: nn.Module, policy: Mapping) -> dict[type, tuple[str, ...]]:
    by_name = {type(m).__name__: type(m) for m in model.modules()}
    out = {}
    for key, names in policy.items():
        cls = key if isinstance(key, type) else by_name.get(str(key))
        if cls is None or not issubclass(cls, nn.Module):
            raise AutoTPError(f"injection_policy key {key!r} is not a module class of this model; use the block "
                              f"class, e.g. {sorted(by_name)[:5]}...")
        out[cls] = (names,) if isinstance(names, str) else tuple(names)
    return out


def _plan_manual(model: nn.Module, plan: TPPlan, policy: Mapping) -> None:
    plan.source = "injection_policy"
    tp = plan.tp
    classes = _policy_classes(model, policy)
    matched = {name: False for names in classes.values() for name in names}
    for path, block in model.named_modules():
        names = next((n for c, n in classes.items() if type(block) is c), None)
        if names is None:
            continue
        for rel, m in block.named_modules():
            if not rel or not _is_linear(m):
                continue
            hit = [n for n in names if rel == n or rel.endswith("." + n)]
            for n in hit:
                matched[n] = True
            style = "row" if hit else "column"
            in_f, out_f = _features(m)
            features = in_f if style == "row" else out_f
            if features % tp:
                raise _indivisible(plan.model_name, f"{'input' if hit else 'output'} features of {path}.{rel}",
                                   features, tp, L.divisors(features))
            plan.projections.append(PlannedProj(f"{path}.{rel}", style, L.even(features, tp)))
        _plan_manual_attrs(plan, path, block)
        _known_extras(model, plan, path, block)
    missing = [n for n, ok in matched.items() if not ok]
    if missing:
        raise AutoTPError(f"injection_policy names {missing}, which match no Linear layer inside the blocks of "
                          f"{plan.model_name}; name the output projections by their path inside the block "
                          "(e.g. 'self_attn.o_proj')")
    if not plan.projections:
        raise AutoTPError(f"injection_policy matched no module of {plan.model_name}")


def _known_extras(model: nn.Module, plan: TPPlan, path: str, block: nn.Module) -> None:
    """A manual policy on a known architecture still needs its per-head inputs cut and its fix-ups (BLOOM's
    ALiBi biases, pretraining_tp), which a policy cannot express."""
    config = getattr(model, "config", None)
    rule = A.rule_for(config)
    if rule is None:
        return
    try:
        block.get_submodule(rule.attention)
    except AttributeError:
        return  # the policy names some other block class
    if rule.alibi(config):
        plan.head_hooks.append((f"{path}.{rule.attention}", rule.heads(config).num_heads))
    for rel, values in rule.fixups.items():
        sub = block.get_submodule(rel) if rel else block
        plan.attrs += [(f"{path}.{rel}", a, v) for a, v in values.items() if hasattr(sub, a)]


def _plan_manual_attrs(plan: TPPlan, path: str, block: nn.Module) -> None:
    for rel, m in block.named_modules():
        for attr in HEAD_ATTR_NAMES + WIDTH_ATTR_NAMES:
            value = getattr(m, attr, None)
            if isinstance(value, bool) or not isinstance(value, int) or attr in vars(type(m)):
                continue
            owner = f"{path}.{rel}" if rel else path
            if value % plan.tp:
                raise _indivisible(plan.model_name, f"heads ({owner}.{attr})", value, plan.tp, L.divisors(value))
            plan.attrs.append((owner, attr, value // plan.tp))


def _plan_vocab(model: nn.Module, plan: TPPlan, mode: bool | str) -> None:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    emb = emb if isinstance(emb, nn.Embedding) and emb.max_norm is None else None
    head = head if isinstance(head, nn.Linear) else None
    tied = emb is not None and head is not None and head.weight is emb.weight

    def wanted(m: nn.Module | None) -> bool:
        if m is None:
            return False
        if mode == "auto":
            return m.weight.numel() >= VOCAB_SPLIT_MIN_ELEMENTS
        return bool(mode)

    split_emb = wanted(emb)
    split_head = split_emb if tied else wanted(head)
    if split_emb:
        plan.vocab.append((_module_path(model, emb), "embedding"))
    if split_head:
        plan.vocab.append((_module_path(model, head), "head"))


def _repeated_block(model: nn.Module) -> nn.Module | None:
    """The most repeated module class that holds several Linear layers: the model's decoder block, probably."""
    counts: dict[type, list[nn.Module]] = {}
    for m in model.modules():
        if m is not model and sum(_is_linear(c) for c in m.modules()) >= 2:
            counts.setdefault(type(m), []).append(m)
    repeated = [ms for ms in counts.values() if len(ms) >= 2]
    if not repeated:
        return None
    best = max(repeated, key=lambda ms: (len(ms), sum(_is_linear(c) for c in ms[0].modules())))
    return best[0]


def _unknown_message(model: nn.Module, name: str, tp: int) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    block = _repeated_block(model)
    hint = ""
    if block is not None:
        outs = [r for r, m in block.named_modules() if _is_linear(m) and r.rsplit(".", 1)[-1] in OUTPUT_NAMES]
        hint = (f" For this model that is probably injection_policy={{{type(block).__name__}: "
                f"{tuple(outs) or ('<output projections>',)}}}.")
    what = f"model_type {model_type!r}" if model_type else "a model without a Hugging Face config"
    return (f"{name}: automatic tensor parallelism has no rules for {what} (supported: "
            f"{', '.join(A.supported_model_types())}), and tensor_parallel.tp_size={tp}. Fix: pass "
            "injection_policy={BlockClass: (names of the block's output projections, which are split by input "
            f"features)}}, or use tp_size=1.{hint}")


# -- applying -----------------------------------------------------------------------------------------------------
class SlicedColumnLinear(nn.Linear):
    """A column-parallel projection whose slice is not a plain split: multi-query / grouped-query attention whose
    key and value heads are replicated on several ranks. A column-parallel forward needs no communication, so a
    Linear over this rank's output ranges (``ranges`` of ``full_out_features``) is the whole layer."""

    def __init__(self, in_features: int, layout: L.ShardLayout, rank: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__(in_features, layout.local_size(rank), bias=bias, dtype=dtype)
        self.full_out_features = layout.total
        self.ranges = layout.ranges(rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_out_features={self.full_out_features}, ranges={list(self.ranges)}"


def _source(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or t.is_meta else t.detach()


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _split_linear(m: nn.Module, p: PlannedProj, group: Any, rank: int, gather: bool = False
                  ) -> tuple[nn.Module, dict[str, TensorShard]]:
    conv = _is_conv1d(m)
    in_f, out_f = _features(m)
    has_bias, dtype, ranges = m.bias is not None, m.weight.dtype, p.layout.ranges(rank)
    with torch.device("meta"):
        if p.style == "row":
            new = InferenceRowParallelLinear(in_f, out_f, has_bias, group=group, split=p.layout.split, dtype=dtype)
        elif p.layout.split is not None:
            cls = InferenceGatherLinear if gather else InferenceColumnParallelLinear
            new = cls(in_f, out_f, has_bias, group=group, split=p.layout.split, gather_output=gather, dtype=dtype)
        else:
            new = SlicedColumnLinear(in_f, p.layout, rank, has_bias, dtype)
    # the stored weight is [out, in] for a Linear and [in, out] for a Conv1D
    split_dim = (0 if p.style == "row" else 1) if conv else (1 if p.style == "row" else 0)
    shards = {"weight": TensorShard(new, "weight", tuple(m.weight.shape), split_dim, ranges, conv,
                                    source=_source(m.weight))}
    if has_bias:
        bias_shard = TensorShard(new, "bias", tuple(m.bias.shape), source=_source(m.bias))
        if p.style == "column":
            bias_shard.dim, bias_shard.ranges = 0, ranges
        shards["bias"] = bias_shard
    return new, shards


def _split_embedding(m: nn.Embedding, group: Any, rank: int, tp: int) -> tuple[nn.Module, dict[str, TensorShard]]:
    split = DimSplit.of(m.num_embeddings, tp)
    with torch.device("meta"):
        new = InferenceVocabParallelEmbedding(m.num_embeddings, m.embedding_dim, m.padding_idx, group=group,
                                              split=split, dtype=m.weight.dtype)
    ranges = tuple(split.ranges(rank))
    return new, {"weight": TensorShard(new, "weight", tuple(m.weight.shape), 0, ranges, source=_source(m.weight))}


def _slice_heads_hook(total: int, lo: int, hi: int) -> Any:
    """Forward pre-hook: per-head tensors the model computed for all heads (ALiBi biases, masks carrying them)
    are cut to this rank's heads ``lo:hi`` before the attention module sees them."""

    def cut(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and t.shape[1] == total:  # [batch, heads, q, kv]
            return t[:, lo:hi]
        if t.dim() == 3 and t.shape[0] % total == 0 and t.shape[0] >= total:  # BLOOM: [batch*heads, 1, kv]
            return t.view(-1, total, *t.shape[1:])[:, lo:hi].reshape(-1, *t.shape[1:])
        return t

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for name in ("alibi", "attention_mask"):
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = cut(kwargs[name])
        return args, kwargs

    return hook


def apply_tensor_parallel(model: nn.Module, plan: TPPlan, group: Any, collectives: Any = None
                          ) -> dict[str, list[TensorShard]]:
    """Swap the planned modules for meta tensor-parallel layers; return state-dict key -> shards of the split ones.

    ``group`` is the tensor-parallel ``Group`` (``plan.tp`` ranks); this rank's index in it picks the slices.
    ``collectives`` (``collectives.py``), when given, carries the layers' all-reduces and gathers.
    """
    split: dict[str, list[TensorShard]] = {}
    if plan.tp == 1:
        return split
    rank = group.rank
    for p in plan.projections:
        new, shards = _split_linear(model.get_submodule(p.path), p, group, rank)
        new.collectives = collectives
        _replace(model, p.path, new)
        split.update({f"{p.path}.{k}": [s] for k, s in shards.items()})
    for path, kind in plan.vocab:
        m = model.get_submodule(path)
        if kind == "embedding":
            new, shards = _split_embedding(m, group, rank, plan.tp)
        else:
            layout = L.even(m.out_features, plan.tp)
            new, shards = _split_linear(m, PlannedProj(path, "column", layout), group, rank, gather=True)
        new.collectives = collectives
        _replace(model, path, new)
        split.update({f"{path}.{k}": [s] for k, s in shards.items()})
    for path, attr, value in plan.attrs:
        setattr(model.get_submodule(path), attr, value)
    for path, total in plan.head_hooks:
        local = total // plan.tp
        model.get_submodule(path).register_forward_pre_hook(
            _slice_heads_hook(total, rank * local, (rank + 1) * local), with_kwargs=True)
    return split


def load_targets(model: nn.Module, split: dict[str, list[TensorShard]], tied: list[list[str]]) -> LoadTargets:
    """Every tensor the model needs (split ones from ``split``, the rest whole), tied names as aliases."""
    aliases = {alias: group[0] for group in tied for alias in group[1:]}
    shards: dict[str, list[TensorShard]] = {}
    for mod_name, module in model.named_modules():
        tables = [(module._parameters, False), ({k: v for k, v in module._buffers.items()
                                                if k not in module._non_persistent_buffers_set}, True)]
        for table, is_buffer in tables:
            for name, t in table.items():
                key = f"{mod_name}.{name}" if mod_name else name
                if t is None or key in aliases or key in shards:
                    continue
                shards[key] = split.get(key) or [TensorShard(module, name, tuple(t.shape), is_buffer=is_buffer,
                                                             source=_source(t))]
    prefix = getattr(model, "base_model_prefix", "") or ""
    return LoadTargets(shards, aliases, (prefix,) if prefix else (), hf_key_renamer(model))


def hf_key_renamer(model: nn.Module) -> Any:
    """Hugging Face's own checkpoint-key renamings for this model (legacy names), or None outside transformers."""
    if not hasattr(model, "config") or not hasattr(model, "base_model_prefix"):
        return None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # older/newer transformers without this internal API: exact names only
        return None
    return (lambda key: apply_renamings(key, renamings)) if renamings else None


def retie(model: nn.Module, tied: list[list[str]]) -> None:
    """Point every tied name at its group's (loaded) primary parameter again; loading replaced the objects."""
    for group in tied:
        primary = model.get_parameter(group[0])
        for alias in group[1:]:
            owner_path, _, name = alias.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            current = owner._parameters.get(name)
            if current is not None and tuple(current.shape) != tuple(primary.shape):
                raise AutoTPError(f"tied parameters {group[0]} {list(primary.shape)} and {alias} "
                                  f"{list(current.shape)} were split differently; split both or neither")
            owner._parameters[name] = primary
