"""Turn whatever the user passed as a config into a plain dict, as DeepSpeed accepts it.

Accepted: a dict (any Mapping); a path to a JSON file (hjson when the ``hjson`` package is installed, as
DeepSpeed uses); a urlsafe-base64 string of JSON; a JSON text; an ``argparse.Namespace`` carrying
``deepspeed_config`` (or the deprecated ``deepscale_config``). Duplicate keys are an error, as in DeepSpeed,
and JSON syntax errors show the line and spot likely causes (unsubstituted template placeholders, comments).
Whatever the source, the result is checked for shape before anything else reads it (:func:`check_shape`): keys are
strings and nesting is at most ``MAX_DEPTH`` levels, so a hostile or broken input (50,000 nested arrays, a 5000-digit
number, ``{1: 2}``) is a ConfigError naming the place, never a RecursionError or AttributeError.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from .errors import KIND_PARSE, KIND_SOURCE, KIND_TYPE, ConfigError, join_path, show

# Real ds_configs nest 4-5 levels and hold a few hundred values; anything far beyond is generated or corrupted.
MAX_DEPTH = 64
MAX_VALUES = 100_000

HOW_TO_PASS = ("Pass a config as config=<dict>, config=\"ds_config.json\" (a path), a urlsafe-base64 JSON string, "
               "or on the command line with --deepspeed_config ds_config.json (parser set up by "
               "shardwise.add_config_arguments).")


class _DuplicateKeys(ValueError):
    def __init__(self, keys: list[str]) -> None:
        super().__init__(", ".join(keys))
        self.keys = keys


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    dupes: list[str] = []
    for key, value in pairs:
        if key in seen and key not in dupes:
            dupes.append(key)
        seen[key] = value
    if dupes:
        raise _DuplicateKeys(dupes)
    return seen


def _syntax_hint(text: str, lineno: int, colno: int) -> str:
    line = text.splitlines()[lineno - 1] if 0 < lineno <= len(text.splitlines()) else ""
    token = re.match(r"[A-Za-z_][A-Za-z0-9_]*", line[colno - 1:]) if colno >= 1 else None
    hint = ""
    if token and token.group(0) not in ("true", "false", "null"):
        hint = (f" '{token.group(0)}' looks like an unsubstituted template placeholder: replace it with a value "
                "(templates such as ds_config_TEMPLATE.json are filled in by their launch script).")
    elif "//" in line or line.lstrip().startswith("#"):
        hint = " JSON has no comments: remove them, or install the 'hjson' package to allow them."
    elif re.match(r"\s*[}\]]", line[colno - 1:] if colno >= 1 else ""):
        hint = " A trailing comma before a closing bracket is not allowed in JSON."
    return f"\n    {lineno:>4} | {line.rstrip()}\n           {' ' * max(colno - 1, 0)}^{hint}"


def parse_text(text: str, label: str) -> dict[str, Any]:
    """Parse JSON (or hjson if installed) config text; ConfigError with the location on failure."""
    try:
        import hjson  # DeepSpeed's parser: JSON plus comments, unquoted keys, trailing commas

        loads, errors = hjson.loads, (hjson.HjsonDecodeError, ValueError)
    except ImportError:
        loads, errors = json.loads, (json.JSONDecodeError,)
    try:
        data = loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeys as exc:
        keys = ", ".join(f"'{k}'" for k in exc.keys)
        raise ConfigError(f"Duplicate keys in config: {keys} (in {label}). JSON would silently keep only the last "
                          "one; DeepSpeed refuses this too. Fix: merge the duplicated entries into one.",
                          kind=KIND_PARSE) from None
    except errors as exc:
        lineno, colno = getattr(exc, "lineno", 0), getattr(exc, "colno", 0)
        reason = getattr(exc, "msg", str(exc))
        raise ConfigError(f"{label}: not valid JSON at line {lineno} column {colno}: {reason}."
                          f"{_syntax_hint(text, lineno, colno)}", kind=KIND_PARSE) from None
    except RecursionError:
        raise ConfigError(f"{label}: the JSON is nested too deeply to parse (a real config nests a few levels; at "
                          f"most {MAX_DEPTH} are accepted). Fix: check the file for runaway brackets [[[ or {{{{{{.",
                          kind=KIND_PARSE) from None
    except ValueError as exc:  # Python refuses integer literals of more than 4300 digits
        why = "it holds an integer with thousands of digits" if "digits" in str(exc) else str(exc)
        raise ConfigError(f"{label}: not a usable JSON document: {why}. Fix: write numbers with at most a few "
                          "dozen digits (use 5e8 notation for large values).", kind=KIND_PARSE) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the config must be a JSON object {{...}} at the top level, not "
                          f"{type(data).__name__}. Fix: wrap the settings in {{ }}.", kind=KIND_PARSE)
    return check_shape(data, label)


def check_shape(data: dict[str, Any], label: str = "config") -> dict[str, Any]:
    """``data`` unchanged if every key is a string and nesting stays within ``MAX_DEPTH``; else ConfigError.

    Iterative (an explicit stack), so a pathological input cannot exhaust Python's recursion limit here.
    """
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    seen = 0
    while stack:
        node, path, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{label}: more than {MAX_VALUES} values (a real config has a few hundred). Fix: "
                              "check that the right file is given, or for a structure that refers to itself.",
                              kind=KIND_PARSE)
        if depth > MAX_DEPTH:
            raise ConfigError(f"{label}: {path or 'the config'} is nested more than {MAX_DEPTH} levels deep (a real "
                              "config nests a few). Fix: check for runaway brackets or a self-referencing structure.",
                              path=path, kind=KIND_PARSE)
        if isinstance(node, Mapping):
            for key, value in node.items():
                if not isinstance(key, str):
                    where = join_path(path, show(key))
                    raise ConfigError(f"{label}: key {show(key)} (of type {type(key).__name__}) at {where}: config "
                                      "keys must be strings, as in JSON. Fix: write the key in double quotes.",
                                      path=where, kind=KIND_TYPE)
                stack.append((value, join_path(path, key), depth + 1))
        elif isinstance(node, (list, tuple)):
            stack.extend((value, join_path(path, i), depth + 1) for i, value in enumerate(node))
    return data


def read_file(path: str) -> dict[str, Any]:
    """A JSON (or hjson) config file as a dict, with errors that name the file, line and fix."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path!r} could not be read: {exc}. Fix: check the path and its "
                          "permissions.", kind=KIND_SOURCE) from None
    return parse_text(text, path)


def _from_string(text: str) -> dict[str, Any]:
    if os.path.isfile(text):
        return read_file(text)
    if text.lstrip().startswith("{"):
        return parse_text(text, "<JSON string>")
    looks_like_path = text.endswith((".json", ".hjson", ".conf")) or os.sep in text or len(text) < 16
    if not looks_like_path:
        try:
            decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8")
        except (binascii.Error, ValueError):
            decoded = ""
        if decoded.lstrip().startswith("{"):
            return parse_text(decoded, "<base64 config>")
    raise ConfigError(f"config {text!r}: no such file (working directory {os.getcwd()}), and not a base64 JSON "
                      f"string. Fix: give the path of an existing ds_config file. {HOW_TO_PASS}", kind=KIND_SOURCE)


def _from_namespace(args: Any, warnings: list[str]) -> dict[str, Any]:
    path = getattr(args, "deepspeed_config", None)
    old = getattr(args, "deepscale_config", None)
    if path is None and old is not None:
        warnings.append("--deepscale_config is deprecated; use --deepspeed_config.")
        path = old
    if path is None:
        raise ConfigError("no config given: the argparse arguments have no --deepspeed_config. " + HOW_TO_PASS,
                          kind=KIND_SOURCE)
    return read_source(path, warnings)


def read_source(source: Any, warnings: list[str]) -> dict[str, Any]:
    """The user's config as a new dict; notes such as deprecations are appended to ``warnings``."""
    if source is None:
        raise ConfigError("no config given. " + HOW_TO_PASS, kind=KIND_SOURCE)
    if isinstance(source, Mapping):
        return check_shape(dict(source))
    if isinstance(source, bytes):
        source = source.decode("utf-8")
    if isinstance(source, str):
        return _from_string(source)
    if isinstance(source, os.PathLike):
        return _from_string(os.fspath(source))
    if hasattr(source, "deepspeed_config") or hasattr(source, "deepscale_config"):
        return _from_namespace(source, warnings)
    raise ConfigError(f"a config of type {type(source).__name__} is not understood. " + HOW_TO_PASS,
                      kind=KIND_SOURCE)
