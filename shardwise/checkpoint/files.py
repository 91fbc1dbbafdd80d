"""The on-disk checkpoint format: safetensors shards plus one JSON manifest. The only module that knows file names.

A checkpoint is a directory ``<save_dir>/<tag>/``::

    manifest.json                         the commit marker and the index (written last, atomically)
    rank00000-<save_id>.safetensors      rank 0's pieces (+ replicated tensors, client_state tensors, RNG)
    rank00001-<save_id>.safetensors      ...one per rank
    <save_dir>/latest                     the last committed tag (plain text, as DeepSpeed)

The manifest records the layout that wrote it (world size, axes, ZeRO stage), engine counters, loss scaler,
scheduler, optimizer hyperparameters, ``client_state`` (JSON; tensors referenced by key) and, for every tensor of
the model (full name, full shape, dtype, parameter or buffer), for each kind of value (``fp32`` master weights,
``model``-dtype weights, ``value`` of frozen tensors and buffers, ``optim.<name>`` optimizer state), the list of
*pieces* that hold it: ``{file, key, flat: [start, end], box}`` (see ``regions.py`` [Note: pieces]). A piece is a 1-D
safetensors entry, so a reader in any layout reads exactly the overlapping range with ``get_slice``. Every file's
byte size and sha256 are in the manifest and checked before use. Nothing here is pickled.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shardwise.checkpoint import manifest_check, regions
from shardwise.checkpoint.errors import CheckpointCorruptError, CheckpointError, CheckpointIncompleteError
from shardwise.checkpoint.safety import HashingWriter, atomic_file, check_size, fault_point, verify_file
from shardwise.common.progress import progress

FORMAT = "shardwise-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
WEIGHT_KINDS = ("fp32", "model", "value")  # where module weights can come from, best first
_OUR_FILE = re.compile(r"^(rank\d{5}-(?P<sid>[0-9a-f]+)\.(safetensors|json|failed)|\.tmp-.*)$")

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_NAMES = {d: str(d).removeprefix("torch.") for d in _ST_DTYPES}
_BY_NAME = {v: k for k, v in _NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the manifest's spelling)."""
    if dtype not in _NAMES:
        raise CheckpointError(f"tensors of dtype {dtype} cannot be checkpointed (supported: {sorted(_BY_NAME)})")
    return _NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    if name not in _BY_NAME:
        raise CheckpointCorruptError(f"the manifest names an unknown dtype {name!r}")
    return _BY_NAME[name]


def shard_name(rank: int, save_id: str) -> str:
    """File name of ``rank``'s safetensors shard for one save."""
    return f"rank{rank:05d}-{save_id}.safetensors"


def rank_index_name(rank: int, save_id: str) -> str:
    """File name of ``rank``'s index (its completion marker until the manifest is committed)."""
    return f"rank{rank:05d}-{save_id}.json"


def stale_files(tag_dir: str, keep_save_id: str) -> list[str]:
    """Our own files in ``tag_dir`` that belong to other saves (replaced or crashed) or are temporary."""
    out = []
    for name in os.listdir(tag_dir):
        m = _OUR_FILE.match(name)
        if m and m.group("sid") != keep_save_id:
            out.append(os.path.join(tag_dir, name))
    return out


# -- writing ---------------------------------------------------------------------------------------------------------
@dataclass
class TensorSpec:
    """One safetensors entry to write: its key, dtype and shape up front, its data on demand (streaming)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @classmethod
    def of(cls, key: str, tensor: torch.Tensor) -> TensorSpec:
        """An entry for a tensor already in hand."""
        return cls(key, tensor.dtype, tuple(tensor.shape), lambda: tensor)

    @property
    def nbytes(self) -> int:
        """Size of the entry's data."""
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def _raw_bytes(t: torch.Tensor) -> Any:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def write_safetensors(path: str, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> dict:
    """Stream ``specs`` into a safetensors file at ``path`` (atomically); returns ``{"bytes", "sha256"}``.

    Only one entry's data is materialised at a time, so consolidating a model needs one full tensor of memory.
    """
    header: dict[str, Any] = {}
    offset = 0
    for s in specs:
        if s.key in header:
            raise CheckpointError(f"duplicate safetensors key {s.key!r} in {path}")
        if s.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{s.key}: dtype {s.dtype} cannot be stored in safetensors")
        header[s.key] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                         "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned for mmap readers
    with atomic_file(path) as f:
        w = HashingWriter(f)
        w.write(struct.pack("<Q", len(blob)))
        w.write(blob)
        fault_point("shard-data")
        for s in progress(specs, f"writing {os.path.basename(path)}", weight=lambda s: s.nbytes, unit="B"):
            t = s.produce()
            if t.dtype != s.dtype or tuple(t.shape) != s.shape:
                raise CheckpointError(f"{s.key}: expected {s.dtype} {s.shape}, got {t.dtype} {tuple(t.shape)}")
            if t.numel():
                w.write(_raw_bytes(t))
    return {"bytes": w.size, "sha256": w.hexdigest()}


# -- the manifest ----------------------------------------------------------------------------------------------------
def _piece_key(p: dict) -> tuple:
    return (tuple(map(tuple, p["box"])) if p.get("box") else None, tuple(p["flat"]))


def _merge_tensor(name: str, into: dict, entry: dict, file_index: int, stage: int, owners: dict) -> None:
    """Add one rank's pieces of ``name``. A tensor held by several pipeline stages (tied weights) is taken from the
    first stage that wrote it (their partitions may be cut differently); identical pieces are kept once."""
    for field in ("shape", "dtype"):
        if into[field] != entry[field]:
            raise CheckpointError(f"ranks disagree on the {field} of {name}: {into[field]} vs {entry[field]}")
    into["dtypes"].update(entry.get("dtypes", {}))
    for what, pieces in entry.get("pieces", {}).items():
        if owners.setdefault((name, what), stage) != stage:
            continue
        have = into["pieces"].setdefault(what, [])
        seen = {_piece_key(p) for p in have}
        for p in pieces:
            if _piece_key(p) not in seen:
                have.append({**p, "file": file_index})


def _check_coverage(name: str, meta: dict) -> None:
    numel = regions.box_numel(regions.full_box(meta["shape"]))
    for what, pieces in meta["pieces"].items():
        covered = sum(p["flat"][1] - p["flat"][0] for p in pieces)
        if covered != numel:
            raise CheckpointError(
                f"internal error: the saved pieces of {name} ({what}) cover {covered} of {numel} elements; "
                "the checkpoint was not committed (please report this with the engine's layout)"
            )


def build_manifest(rank_indexes: list[dict], *, tag: str, save_id: str) -> dict:
    """Merge every rank's index into the manifest (rank 0's index carries the global fields)."""
    # by pipeline stage, then rank: the first stage holding a tied weight provides it
    rank_indexes = sorted(rank_indexes, key=lambda r: (r.get("coords", {}).get("pp", 0), r["rank"]))
    files, tensors, aliases, excluded, ranks, owners = [], {}, {}, set(), [], {}
    for i, idx in enumerate(rank_indexes):
        files.append({"name": idx["file"]["name"], "rank": idx["rank"], "bytes": idx["file"]["bytes"],
                      "sha256": idx["file"]["sha256"]})
        for name, entry in idx["tensors"].items():
            if name not in tensors:
                tensors[name] = {k: v for k, v in entry.items() if k not in ("pieces", "dtypes")}
                tensors[name].update(pieces={}, dtypes={})
            _merge_tensor(name, tensors[name], entry, i, idx.get("coords", {}).get("pp", 0), owners)
        aliases.update(idx.get("aliases", {}))
        excluded.update(idx.get("excluded", []))
        ranks.append({"rank": idx["rank"], "file": i, "coords": idx.get("coords", {}), "rng": idx.get("rng")})
    for name, meta in tensors.items():
        _check_coverage(name, meta)
    first = next(i for i, idx in enumerate(rank_indexes) if idx["rank"] == 0)
    head = rank_indexes[first].get("global", {})
    return {"format": FORMAT, "version": VERSION, "tag": tag, "save_id": save_id, **head, "global_file": first,
            "files": files, "ranks": ranks, "tensors": tensors, "aliases": aliases, "excluded": sorted(excluded)}


# -- reading ---------------------------------------------------------------------------------------------------------
def _why_no_manifest(tag_dir: str) -> str:
    if not os.path.isdir(tag_dir):
        return f"checkpoint directory {tag_dir} does not exist"
    names = os.listdir(tag_dir)
    if any(n.endswith((".pt", ".pth", ".bin")) for n in names):
        return (f"{tag_dir} holds torch/pickle files ({', '.join(sorted(n for n in names if '.' in n)[:3])}...) "
                "and no shardwise manifest: it looks like a DeepSpeed checkpoint. shardwise never unpickles "
                "checkpoint files; consolidate it with DeepSpeed's zero_to_fp32 first and load the weights into "
                "the model before shardwise.initialize()")
    if any(_OUR_FILE.match(n) for n in names):
        return (f"{tag_dir} has no {MANIFEST}: the save of this tag did not finish (a rank stopped before the "
                "commit). Load the tag named in `latest` (the last committed save) instead")
    return f"{tag_dir} is not a shardwise checkpoint (no {MANIFEST})"


def read_manifest(tag_dir: str) -> dict:
    """Parse and sanity-check ``tag_dir/manifest.json``."""
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointIncompleteError(_why_no_manifest(tag_dir))
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointCorruptError(f"{path} is not valid JSON ({reason}); restore it or load an earlier "
                                     "tag") from None
    except OSError as exc:
        raise CheckpointCorruptError(f"{path} cannot be read ({exc.strerror or exc}); check its "
                                     "permissions") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointCorruptError(f"{path} is not a shardwise checkpoint manifest")
    version = manifest.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointCorruptError(f"{path}: version = {version!r} is not a format version number")
    if version > VERSION:
        raise CheckpointError(f"{path} has format version {version}; this shardwise reads up to {VERSION}: upgrade "
                              "shardwise")
    return manifest_check.validate(manifest, path, frozenset(_BY_NAME))


class CheckpointReader:
    """Random access to a committed checkpoint: verification, tensor ranges in any layout, raw entries."""

    def __init__(self, tag_dir: str) -> None:
        self.tag_dir = tag_dir
        self.manifest = read_manifest(tag_dir)
        self._handles: dict[int, Any] = {}

    # -- files ---------------------------------------------------------------------------------------------------
    @property
    def files(self) -> list[dict]:
        """The manifest's file table (name, rank, bytes, sha256)."""
        return self.manifest["files"]

    def file_path(self, index: int) -> str:
        """Path of file ``index``; refused if it resolves outside the tag directory (e.g. through a symbolic link)."""
        path = os.path.join(self.tag_dir, self.files[index]["name"])
        root = os.path.realpath(self.tag_dir)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise CheckpointCorruptError(
                f"{os.path.join(self.tag_dir, MANIFEST)}: files[{index}] = {self.files[index]['name']!r} resolves to "
                f"{os.path.realpath(path)}, outside the checkpoint directory {root}; refusing to read it. Replace the "
                "link with the file itself")
        return path

    def verify(self, indices: Sequence[int] | None = None) -> list[str]:
        """Check size and sha256 of the given files (all by default); returns one error message per bad file."""
        errors = []
        for i in range(len(self.files)) if indices is None else indices:
            try:
                verify_file(self.file_path(i), self.files[i]["bytes"], self.files[i]["sha256"])
            except CheckpointCorruptError as exc:
                errors.append(str(exc))
        return errors

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            from safetensors import safe_open

            path = self.file_path(index)
            check_size(path, self.files[index]["bytes"])
            try:
                self._handles[index] = safe_open(path, framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointCorruptError(
                    f"checkpoint file {path} is not a valid safetensors file ({exc}); restore it from a copy of the "
                    "checkpoint, or load an earlier tag") from None
        return self._handles[index]

    def has_entry(self, index: int, key: str) -> bool:
        """Whether file ``index`` holds entry ``key``."""
        return key in self._handle(index).keys()

    def read_entry(self, index: int, key: str) -> torch.Tensor:
        """A whole safetensors entry of file ``index`` (RNG states, client_state tensors)."""
        h = self._handle(index)
        if key not in h.keys():
            raise CheckpointCorruptError(f"{self.file_path(index)} has no entry {key!r} (the manifest lists it)")
        return h.get_tensor(key)

    def close(self) -> None:
        """Release open files."""
        self._handles.clear()

    # -- tensors -------------------------------------------------------------------------------------------------
    @property
    def tensors(self) -> dict[str, dict]:
        """Per tensor: shape, dtype, kind, and its pieces by value kind."""
        return self.manifest["tensors"]

    def resolve(self, name: str) -> str | None:
        """The saved tensor that ``name`` refers to (following tied-weight aliases), or None."""
        if name in self.tensors:
            return name
        target = self.manifest.get("aliases", {}).get(name)
        return target if target in self.tensors else None

    def kind_of(self, name: str, kinds: Sequence[str]) -> str | None:
        """The first of ``kinds`` the checkpoint holds for tensor ``name``."""
        pieces = self.tensors[name]["pieces"]
        return next((k for k in kinds if k in pieces), None)

    def _slice(self, piece: dict, lo: int, hi: int) -> torch.Tensor:
        h = self._handle(piece["file"])
        try:
            sl = h.get_slice(piece["key"])
        except Exception:
            raise CheckpointCorruptError(f"{self.file_path(piece['file'])} has no entry {piece['key']!r}") from None
        if sl.get_shape() != [piece["flat"][1] - piece["flat"][0]]:
            raise CheckpointCorruptError(f"{self.file_path(piece['file'])}: entry {piece['key']!r} has shape "
                                         f"{sl.get_shape()}, the manifest says {piece['flat']}")
        return sl[lo:hi]

    def read(self, name: str, kind: str, *, box: regions.Box | None = None, flat: tuple[int, int] | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Elements ``flat`` of the row-major flattening of ``box`` of tensor ``name`` (default: all of it).

        Returns a 1-D tensor when ``flat`` is given, else a tensor shaped like the box. Reads only the overlapping
        ranges of the pieces that hold them; raises if the checkpoint does not cover them.
        """
        meta = self.tensors[name]
        want_box = regions.normalize_box(box, meta["shape"])
        lo, hi = flat if flat is not None else (0, regions.box_numel(want_box))
        pieces = meta["pieces"].get(kind)
        if pieces is None:
            raise CheckpointError(f"the checkpoint has no {kind!r} values for {name}")
        saved = dtype_from_name(meta.get("dtypes", {}).get(kind, meta["dtype"]))
        out = torch.empty(hi - lo, dtype=saved)
        covered = 0
        for p in pieces:
            p_box = regions.normalize_box(p.get("box"), meta["shape"])
            if p_box == want_box:
                o = regions.overlap((lo, hi), tuple(p["flat"]))
                if o is not None:
                    out[o[0] - lo : o[1] - lo] = self._slice(p, o[0] - p["flat"][0], o[1] - p["flat"][0])
                    covered += o[1] - o[0]
            elif regions.intersect_boxes(p_box, want_box) is not None:
                covered += self._copy_across_boxes(p, p_box, want_box, (lo, hi), out, saved)
        if covered != hi - lo:
            raise CheckpointError(f"the checkpoint covers {covered} of the {hi - lo} elements of {name} ({kind}) "
                                  "this rank needs; it is incomplete for this layout")
        out = out if dtype is None else out.to(dtype)
        return out if flat is not None else out.view(regions.box_shape(want_box))

    def _copy_across_boxes(self, piece: dict, p_box: regions.Box, want_box: regions.Box, want: tuple[int, int],
                           out: torch.Tensor, dtype: torch.dtype) -> int:
        """Tensor-parallel reshard: move the piece's part of the box intersection into ``out``; returns elements."""
        inter = regions.intersect_boxes(p_box, want_box)
        src = torch.zeros(regions.box_numel(p_box), dtype=dtype)
        have = torch.zeros(regions.box_numel(p_box), dtype=torch.bool)
        s, e = piece["flat"]
        src[s:e] = self._slice(piece, 0, e - s)
        have[s:e] = True
        dst = torch.zeros(regions.box_numel(want_box), dtype=dtype)
        got = torch.zeros(regions.box_numel(want_box), dtype=torch.bool)
        sl_src = tuple(slice(a - b, c - b) for (a, c), (b, _) in zip(inter, p_box))
        sl_dst = tuple(slice(a - b, c - b) for (a, c), (b, _) in zip(inter, want_box))
        dst.view(regions.box_shape(want_box))[sl_dst] = src.view(regions.box_shape(p_box))[sl_src]
        got.view(regions.box_shape(want_box))[sl_dst] = have.view(regions.box_shape(p_box))[sl_src]
        lo, hi = want
        mask = got[lo:hi]
        out[mask] = dst[lo:hi][mask]
        return int(mask.sum())


def failure_marker_name(rank: int, save_id: str) -> str:
    """File a rank leaves when its part of an asynchronous save failed (so rank 0 stops waiting for it)."""
    return f"rank{rank:05d}-{save_id}.failed"


def read_latest(save_dir: str, universal: bool = False) -> str | None:
    """The tag in ``save_dir/latest`` (``latest_universal`` first when ``universal``), or None if there is none.

    A ``latest`` file that exists but is empty, unreadable or not text is an error (CheckpointCorruptError), never
    "no checkpoint": a script that resumes when a checkpoint exists must not silently start from scratch.
    """
    names = (LATEST_UNIVERSAL, LATEST) if universal else (LATEST,)
    for name in names:
        path = os.path.join(save_dir, name)
        if not os.path.lexists(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tag = f.read(4096).strip()
        except (OSError, ValueError) as exc:
            raise CheckpointCorruptError(f"{path} cannot be read as a tag name ({exc}); write the tag to resume "
                                         "from into it (e.g. global_step100), or pass tag=... explicitly") from None
        if not tag:
            raise CheckpointCorruptError(f"{path} is empty, so it names no checkpoint (a save that wrote `latest` "
                                         "always writes a tag); write the tag to resume from into it, or pass "
                                         "tag=... explicitly, or delete it to start from scratch")
        return tag
    return None
