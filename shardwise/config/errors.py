"""ConfigError and the helpers that turn every config problem into one readable message.

Owns the wording of config errors: each problem names the dotted key path, the value found, what was expected
and the fix. pydantic's ValidationError is converted here (never shown raw), and close-match suggestions for
misspelled keys come from here too, so the loader, the checks and the support table all speak the same way.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Problem kinds, also exposed as ConfigError.kind so callers and tests can branch on the category.
KIND_SOURCE = "source"  # the config could not be found or read (bad path, None, undecodable string)
KIND_PARSE = "parse"  # the text is not valid JSON / hjson, or has duplicate keys
KIND_UNKNOWN_KEY = "unknown_key"  # a misspelled or unknown key
KIND_TYPE = "type"  # a value of the wrong type or out of range
KIND_BATCH = "batch"  # the train_batch_size / micro-batch / accumulation arithmetic does not work out
KIND_CONFLICT = "conflict"  # two settings that cannot be combined (fp16 + bf16, offload_param without ZeRO-3, ...)
KIND_UNSUPPORTED = "unsupported"  # a DeepSpeed feature shardwise does not implement yet
KIND_REMOVED = "removed"  # a feature DeepSpeed 0.19.8 itself removed


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (dotted path), what, and which category."""

    path: str
    message: str
    kind: str


class ConfigError(ValueError):
    """A DeepSpeed/shardwise config that cannot be used, with every problem found explained.

    ``str(err)`` is the full human-readable text. ``err.kind`` is the category of the first problem (one of
    the ``KIND_*`` constants: "parse", "unknown_key", "type", "batch", "conflict", "unsupported", "removed",
    "source"), ``err.path`` its dotted key path, and ``err.problems`` the full list.
    """

    def __init__(self, message: str, *, path: str = "", kind: str = KIND_TYPE,
                 problems: Sequence[Problem] = ()) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems) or (Problem(path, message, kind),)
        self.kind = self.problems[0].kind
        self.path = self.problems[0].path
        super().__init__(message)

    @classmethod
    def from_problems(cls, problems: Sequence[Problem]) -> ConfigError:
        """One error carrying every problem; the message numbers them when there is more than one."""
        if len(problems) == 1:
            return cls(problems[0].message, problems=problems)
        lines = [f"{len(problems)} problems in the config:"]
        lines += [f"  {i}. {p.message}" for i, p in enumerate(problems, 1)]
        return cls("\n".join(lines), problems=problems)


def show(value: Any) -> str:
    """Render a config value as the user would have written it in JSON (strings quoted, true/false/null)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"  # str() refuses > 4300
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value)
        except (ValueError, RecursionError):
            text = f"<a {type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def join_path(prefix: str, key: str | int) -> str:
    """Dotted path of ``key`` under ``prefix``; list indices render as ``[i]``."""
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def suggest(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The closest candidate to ``name`` (case-insensitive), or None when nothing is close."""
    pool = list(candidates)
    lowered = {c.lower(): c for c in pool}
    if name.lower() in lowered:
        return lowered[name.lower()]
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=cutoff)
    return lowered[hits[0]] if hits else None


# pydantic error type -> (expected ..., fix) when our own validators did not produce the message.
_PYDANTIC_EXPECTED = {
    "missing": ("a value: this key is required", "add it"),
    "model_type": ("a JSON object {...}", "write the block as an object of key/value pairs"),
    "model_attributes_type": ("a JSON object {...}", "write the block as an object of key/value pairs"),
    "dict_type": ("a JSON object {...}", "write an object of key/value pairs"),
    "list_type": ("a JSON list [...]", "write a list, e.g. [1, 2]"),
    "string_type": ("a string", "put the value in double quotes"),
    "extra_forbidden": ("no such key here", "remove the key"),
}


def _expected_from_pydantic(err: dict[str, Any]) -> tuple[str, str]:
    etype = err.get("type", "")
    ctx = err.get("ctx") or {}
    if etype == "literal_error":
        return f"one of {ctx.get('expected', '')}", "use one of those values"
    for bound, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx and etype.startswith(("greater", "less")):
            return f"a number {word} {ctx[bound]}", f"use a value {word} {ctx[bound]}"
    if etype in _PYDANTIC_EXPECTED:
        return _PYDANTIC_EXPECTED[etype]
    return err.get("msg", "a valid value"), "correct the value"


def problems_from_validation(exc: Any, prefix: str = "") -> list[Problem]:
    """Convert a pydantic ``ValidationError`` into Problems with dotted paths (no pydantic jargon)."""
    problems = []
    for err in exc.errors(include_url=False):
        path = prefix
        for part in err.get("loc", ()):
            # pydantic puts the tag of a union member ("int", "function-after[...]") in loc; skip those.
            if isinstance(part, str) and ("[" in part or part in ("int", "str", "float", "bool", "none")):
                continue
            path = join_path(path, part)
        value = err.get("input")
        ctx = err.get("ctx") or {}
        if err.get("type", "").startswith("sw_"):
            expected, fix = ctx.get("expected", err.get("msg", "")), ctx.get("fix", "correct the value")
        else:
            expected, fix = _expected_from_pydantic(err)
        if err.get("type") == "missing":
            message = f"{path}: missing; expected {expected}. Fix: {fix}."
        else:
            message = f"{path} = {show(value)}: expected {expected}. Fix: {fix}."
        problems.append(Problem(path, message, KIND_TYPE))
    return problems
