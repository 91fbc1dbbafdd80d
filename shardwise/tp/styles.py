"""Tensor-parallel styles and the declarative plan machinery: ``{module-path pattern: style}``, applied by
swapping modules in place (``apply_plan``). ``plans.py`` is the public face (with the built-in plans); the
styles table there describes each style.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from shardwise.tp.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from shardwise.tp.mappings import resolve_group


class PlanError(ValueError):
    """A plan does not fit the model; the message names the pattern or module and the fix."""


@dataclass(frozen=True)
class ColwiseParallel:
    """Split a Linear's output features (see ``ColumnParallelLinear``)."""

    gather_output: bool = False
    sequence_parallel: bool = False
    grain: int = 1
    parts: tuple[int, ...] | None = None

    def apply(self, module: nn.Module, group: Any) -> nn.Module:
        """The column-parallel replacement of ``module``."""
        _expect(module, nn.Linear, self)
        return ColumnParallelLinear.from_linear(module, group, gather_output=self.gather_output,
                                                sequence_parallel=self.sequence_parallel, grain=self.grain,
                                                parts=self.parts)


@dataclass(frozen=True)
class RowwiseParallel:
    """Split a Linear's input features (see ``RowParallelLinear``)."""

    input_is_parallel: bool = True
    sequence_parallel: bool = False
    grain: int = 1
    parts: tuple[int, ...] | None = None

    def apply(self, module: nn.Module, group: Any) -> nn.Module:
        """The row-parallel replacement of ``module``."""
        _expect(module, nn.Linear, self)
        return RowParallelLinear.from_linear(module, group, input_is_parallel=self.input_is_parallel,
                                             sequence_parallel=self.sequence_parallel, grain=self.grain,
                                             parts=self.parts)


@dataclass(frozen=True)
class VocabParallel:
    """Split an Embedding's vocabulary (see ``VocabParallelEmbedding``)."""

    sequence_parallel: bool = False
    grain: int = 1

    def apply(self, module: nn.Module, group: Any) -> nn.Module:
        """The vocabulary-parallel replacement of ``module``."""
        _expect(module, nn.Embedding, self)
        return VocabParallelEmbedding.from_embedding(module, group, sequence_parallel=self.sequence_parallel,
                                                     grain=self.grain)


@dataclass(frozen=True)
class SequenceParallel:
    """Keep the module, mark its parameters ``sequence_parallel = True`` (it runs on sequence shards)."""

    def apply(self, module: nn.Module, group: Any) -> nn.Module:
        """The same module, its parameters marked."""
        for p in module.parameters():
            p.sequence_parallel = True
        return module


@dataclass(frozen=True)
class LocalHeads:
    """Keep the module, divide the named integer attributes it holds by the tensor-parallel degree.

    For attention modules that reshape with their head count (transformers 4.x's ``LlamaAttention.num_heads``):
    after q/k/v are split each rank holds ``heads / degree`` heads. Names the module lacks are skipped, so one plan
    serves releases that keep different attributes (5.x's LLaMA reshapes with ``-1`` and keeps none of them).
    """

    attrs: tuple[str, ...]

    def apply(self, module: nn.Module, group: Any) -> nn.Module:
        """The same module, its attributes divided."""
        for name in self.attrs:
            value = vars(module).get(name)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if value % group.size:
                raise PlanError(f"{type(module).__name__}.{name}={value} does not divide over {group.size} tensor "
                                "ranks; pick a degree that divides it")
            setattr(module, name, value // group.size)
        return module


Style = ColwiseParallel | RowwiseParallel | VocabParallel | SequenceParallel | LocalHeads
STYLE_NAMES: dict[str, Style | None] = {
    "colwise": ColwiseParallel(),
    "colwise_gather": ColwiseParallel(gather_output=True),
    "rowwise": RowwiseParallel(),
    "vocab": VocabParallel(),
    "embedding": VocabParallel(),
    "sequence_parallel": SequenceParallel(),
    "replicate": None,
}


def _expect(module: nn.Module, cls: type, style: Any) -> None:
    if not isinstance(module, cls):
        raise PlanError(f"{type(style).__name__} applies to {cls.__name__} modules, got {type(module).__name__}; "
                        "fix the plan's pattern so it matches only such modules")


def _style(value: Any) -> Style | None:
    if isinstance(value, str):
        try:
            return STYLE_NAMES[value.lower()]
        except KeyError:
            raise PlanError(f"unknown style {value!r}; use one of {sorted(STYLE_NAMES)} or a style object") from None
    if value is None or hasattr(value, "apply"):
        return value
    raise PlanError(f"a plan style must be a style object, a name or None, got {value!r}")


def matches(pattern: str, path: str) -> bool:
    """Whether dotted ``path`` matches ``pattern`` atom by atom (``*`` never crosses a dot)."""
    p_atoms, atoms = pattern.split("."), path.split(".")
    return len(p_atoms) == len(atoms) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(atoms, p_atoms))


def resolve_plan(module: nn.Module, plan: Mapping[str, Any], strict: bool = True) -> list[tuple[str, Style | None]]:
    """``(module path, style)`` for every module a pattern matches (first pattern wins), in module order.

    With ``strict``, a pattern that matches no module is an error (usually a typo or a different model family).
    """
    styles = [(pattern, _style(value)) for pattern, value in plan.items()]
    used: set[str] = set()
    chosen = []
    for path, _ in module.named_modules():
        if not path:
            continue
        for pattern, style in styles:
            if matches(pattern, path):
                used.add(pattern)
                chosen.append((path, style))
                break
    unused = [p for p, _ in styles if p not in used]
    if strict and unused:
        raise PlanError(f"plan patterns matched no module: {unused}. Module paths look like "
                        f"{[n for n, _ in module.named_modules() if n][:6]}...; fix the patterns or pass strict=False")
    return chosen


def apply_plan(module: nn.Module, plan: Mapping[str, Any], group: Any, strict: bool = True) -> nn.Module:
    """Swap every module the plan matches for its tensor-parallel version, slicing the existing weights.

    ``group``: the tensor-parallel group (``Group``, ProcessGroup or ``Topology``). Returns ``module`` (changed in
    place). Every rank must hold the same full weights before the call (same seed, or a loaded checkpoint).
    """
    g = resolve_group(group)
    for path, style in resolve_plan(module, plan, strict):
        if style is None:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        new = style.apply(getattr(parent, name), g)
        if new is not getattr(parent, name):
            setattr(parent, name, new)
    return module


def describe_plan(plan: Mapping[str, Any]) -> Sequence[str]:
    """One line per pattern, for logs."""
    return [f"{pattern}: {value!r}" for pattern, value in plan.items()]
