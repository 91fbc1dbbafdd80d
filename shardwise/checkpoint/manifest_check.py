"""Validate a parsed ``manifest.json`` before anything reads it: every field the loaders use has the right shape.

A manifest is data from disk: edited by hand, damaged, or crafted. Every file name must stay inside the tag directory
(no absolute path, no ``..``: the reader also checks that the resolved path does not leave the directory through a
symbolic link), every index into the file table must exist, every counter must be an integer, every piece must lie
within its tensor. A violation is a ``CheckpointCorruptError`` naming the manifest, the field and the bad value, so
loading never fails later with an IndexError, a ValueError from ``int("abc")`` or a read outside the checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from shardwise.checkpoint.errors import CheckpointCorruptError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


class _Check:
    """Collects the path of the field being checked, for the error message."""

    def __init__(self, manifest_path: str, dtype_names: frozenset[str]) -> None:
        self.where = manifest_path
        self.dtypes = dtype_names

    def fail(self, field: str, value: Any, expected: str) -> CheckpointCorruptError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return CheckpointCorruptError(
            f"{self.where}: {field} = {shown} is not valid ({expected} expected); the manifest was damaged or edited. "
            "Restore it from a copy of the checkpoint, or load an earlier tag")

    def get(self, node: dict, key: str, field: str, test: Callable[[Any], bool], expected: str,
            optional: bool = False) -> Any:
        if key not in node:
            if optional:
                return None
            raise self.fail(field, "<missing>", expected)
        value = node[key]
        if not test(value):
            raise self.fail(field, value, expected)
        return value


def _int(value: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value < high)


def _dict(value: Any) -> bool:
    return isinstance(value, dict)


def _str(value: Any) -> bool:
    return isinstance(value, str)


def safe_file_name(name: Any) -> bool:
    """A relative name inside the directory: not absolute, no ``..`` or empty component, no NUL or backslash."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name or os.path.isabs(name):
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def _files(c: _Check, m: dict) -> int:
    files = c.get(m, "files", "files", lambda v: isinstance(v, list) and v, "a non-empty list")
    for i, f in enumerate(files):
        at = f"files[{i}]"
        if not _dict(f):
            raise c.fail(at, f, "an object")
        c.get(f, "name", f"{at}.name", safe_file_name, "a file name inside the tag directory")
        c.get(f, "bytes", f"{at}.bytes", _int, "a byte count")
        c.get(f, "sha256", f"{at}.sha256", lambda v: _str(v) and bool(_SHA256.match(v)), "64 hex digits")
        c.get(f, "rank", f"{at}.rank", _int, "a rank")
    return len(files)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _box_ok(box: Any, shape: list[int]) -> bool:
    return (isinstance(box, list) and len(box) == len(shape) and all(
        isinstance(b, list) and len(b) == 2 and _int(b[0]) and _int(b[1]) and b[0] <= b[1] <= d
        for b, d in zip(box, shape)))


def _range_ok(flat: Any, numel: int) -> bool:
    return isinstance(flat, list) and len(flat) == 2 and _int(flat[0]) and _int(flat[1]) and flat[0] <= flat[1] <= numel


def _pieces(c: _Check, at: str, pieces: Any, shape: list[int], n_files: int) -> None:
    if not isinstance(pieces, list):
        raise c.fail(at, pieces, "a list of pieces")
    for j, p in enumerate(pieces):
        here = f"{at}[{j}]"
        if not _dict(p):
            raise c.fail(here, p, "an object")
        c.get(p, "key", f"{here}.key", _str, "a string")
        c.get(p, "file", f"{here}.file", lambda v: _int(v, 0, n_files), f"an index into files (0..{n_files - 1})")
        box = c.get(p, "box", f"{here}.box", lambda v: v is None or _box_ok(v, shape), "a box within the tensor",
                    optional=True)
        numel = _numel([hi - lo for lo, hi in box]) if box else _numel(shape)
        c.get(p, "flat", f"{here}.flat", lambda v, n=numel: _range_ok(v, n), f"[start, end] within 0..{numel}")


def _tensors(c: _Check, m: dict, n_files: int) -> None:
    tensors = c.get(m, "tensors", "tensors", _dict, "an object")
    for name, t in tensors.items():
        at = f"tensors[{name!r}]"
        if not _dict(t):
            raise c.fail(at, t, "an object")
        shape = c.get(t, "shape", f"{at}.shape", lambda v: isinstance(v, list) and all(_int(d) for d in v),
                      "a list of sizes")
        c.get(t, "dtype", f"{at}.dtype", lambda v: v in c.dtypes, "a dtype name")
        c.get(t, "kind", f"{at}.kind", lambda v: v in ("param", "buffer"), '"param" or "buffer"')
        dtypes = c.get(t, "dtypes", f"{at}.dtypes", _dict, "an object", optional=True) or {}
        for kind, d in dtypes.items():
            if d not in c.dtypes:
                raise c.fail(f"{at}.dtypes[{kind!r}]", d, "a dtype name")
        pieces = c.get(t, "pieces", f"{at}.pieces", _dict, "an object")
        for kind, ps in pieces.items():
            _pieces(c, f"{at}.pieces[{kind!r}]", ps, shape, n_files)


def _rng(c: _Check, at: str, rng: Any) -> None:
    if rng is None:
        return
    if not _dict(rng):
        raise c.fail(at, rng, "an object")
    py = c.get(rng, "python", f"{at}.python", _dict, "an object")
    c.get(py, "version", f"{at}.python.version", _int, "an integer")
    np_state = c.get(rng, "numpy", f"{at}.numpy", _dict, "an object")
    for key in ("pos", "has_gauss"):
        c.get(np_state, key, f"{at}.numpy.{key}", _int, "an integer")


def _ranks(c: _Check, m: dict, n_files: int) -> None:
    ranks = c.get(m, "ranks", "ranks", lambda v: isinstance(v, list) and v, "a non-empty list")
    for i, r in enumerate(ranks):
        at = f"ranks[{i}]"
        if not _dict(r):
            raise c.fail(at, r, "an object")
        c.get(r, "rank", f"{at}.rank", _int, "a rank")
        c.get(r, "file", f"{at}.file", lambda v: _int(v, 0, n_files), f"an index into files (0..{n_files - 1})")
        _rng(c, f"{at}.rng", r.get("rng"))


def _training_state(c: _Check, m: dict) -> None:
    layout = c.get(m, "layout", "layout", _dict, "an object")
    c.get(layout, "world_size", "layout.world_size", lambda v: _int(v, 1), "a positive integer")
    c.get(layout, "zero_stage", "layout.zero_stage", lambda v: _int(v, 0, 4), "0, 1, 2 or 3")
    engine = c.get(m, "engine", "engine", _dict, "an object")
    for key in _COUNTERS:
        c.get(engine, key, f"engine.{key}", _int, "a non-negative integer")
    c.get(engine, "gradient_accumulation_steps", "engine.gradient_accumulation_steps", _int, "an integer",
          optional=True)
    scaler = c.get(m, "scaler", "scaler", _dict, "an object")
    c.get(scaler, "type", "scaler.type", _str, "a class name")
    c.get(scaler, "state", "scaler.state", _dict, "an object")
    sched = c.get(m, "lr_scheduler", "lr_scheduler", lambda v: v is None or _dict(v), "null or an object",
                  optional=True)
    if sched is not None:
        c.get(sched, "type", "lr_scheduler.type", _str, "a class name")
    opt = c.get(m, "optimizer", "optimizer", lambda v: v is None or _dict(v), "null or an object", optional=True)
    if opt is not None:
        c.get(opt, "type", "optimizer.type", _str, "a class name")
        groups = c.get(opt, "groups", "optimizer.groups", lambda v: isinstance(v, list), "a list")
        for i, g in enumerate(groups):
            ok = _dict(g) and isinstance(g.get("state"), bool) and _dict(g.get("scalars"))
            if not ok:
                raise c.fail(f"optimizer.groups[{i}]", g, '{"state": bool, "scalars": {...}}')
        c.get(opt, "param_groups", "optimizer.param_groups", lambda v: isinstance(v, list) and all(map(_dict, v)),
              "a list of objects")


def validate(manifest: dict, manifest_path: str, dtype_names: frozenset[str]) -> dict:
    """``manifest`` unchanged when its file table, tensors and ranks are well-formed; else CheckpointCorruptError.
    Enough for every reader (consolidation included); :func:`validate_training_state` adds what a resume reads."""
    c = _Check(manifest_path, dtype_names)
    n_files = _files(c, manifest)
    c.get(manifest, "global_file", "global_file", lambda v: _int(v, 0, n_files),
          f"an index into files (0..{n_files - 1})", optional=True)
    _tensors(c, manifest, n_files)
    _ranks(c, manifest, n_files)
    c.get(manifest, "aliases", "aliases", lambda v: _dict(v) and all(map(_str, v.values())), "an object of names",
          optional=True)
    c.get(manifest, "excluded", "excluded", lambda v: isinstance(v, list) and all(map(_str, v)), "a list of names",
          optional=True)
    return manifest


def validate_training_state(manifest: dict, manifest_path: str) -> None:
    """Check the fields an engine resume reads: layout, counters, loss scaler, LR scheduler, optimizer groups."""
    _training_state(_Check(manifest_path, frozenset()), manifest)
