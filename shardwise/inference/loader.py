"""Per-rank checkpoint loading: each rank reads only its slices of each tensor, then materialises its shard.

The model arrives with its parameters on the meta device (built from a config, handed in on meta, or replaced by
tensor-parallel layers that were built on meta). ``autotp`` says, for every state-dict key, which module
parameter receives which index ranges of which dimension of the full tensor (``TensorShard``). This module
reads those ranges and nothing else:

* **safetensors** files are read with ``safe_open(...).get_slice``, tensors in file (data-offset) order, so reads
  stream through each file once. safetensors maps the file: pages a slice touches count in the process's
  resident set until the mapping is closed, and a slice along dimension 1 (row-parallel weights) touches every
  page of the tensor. The file is therefore reopened every ``MAP_WINDOW_BYTES`` of tensor data read, bounding the
  mapped, resident part of the file to one window instead of the whole file.
* ``.bin`` / ``.pt`` files (torch pickles) are opened with ``torch.load(mmap=True, weights_only=True)`` and
  sliced the same way.
* a model that already holds real weights (no checkpoint) is sliced in memory by the same code.

Each slice is copied straight into a fresh tensor of the target dtype on the target device, so a rank's peak is
its shard plus one tensor in flight, never the whole model. ``LoadStats`` counts the bytes each rank read.
Errors (missing file, corrupted or truncated header, shape mismatch, keys missing from the checkpoint) name the
file or key and the fix.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardwise.common.progress import progress

#: tensor data read through one safetensors mapping before it is closed and reopened (see the module docstring);
#: 32 MiB keeps the resident part of the mapping small next to a shard, and reopening costs one header parse
MAP_WINDOW_BYTES = 32 << 20
_HEADER_LIMIT = 100 << 20  # safetensors refuses headers above 100 MB as well
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the file or key and how to fix it."""


@dataclass
class TensorShard:
    """Where (part of) one full checkpoint tensor goes on this rank.

    ``dim`` is the dimension of the tensor *as stored* that is sliced (None: the whole tensor), ``ranges`` the
    index ranges kept along it (concatenated in order), ``transpose`` whether the stored tensor is the transpose
    of the parameter (GPT-2's ``Conv1D`` stores ``[in, out]``). ``source`` is the full in-memory tensor when the
    model already holds its weights (no checkpoint needed).
    """

    module: nn.Module
    name: str
    full_shape: tuple[int, ...]
    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()
    transpose: bool = False
    is_buffer: bool = False
    source: torch.Tensor | None = None

    def local_shape(self) -> tuple[int, ...]:
        """Shape of the tensor this rank materialises (after slicing and transposing)."""
        shape = list(self.full_shape)
        if self.dim is not None:
            shape[self.dim] = sum(hi - lo for lo, hi in self.ranges)
        return tuple(reversed(shape)) if self.transpose else tuple(shape)


@dataclass
class LoadTargets:
    """Everything a rank must load: state-dict key -> shards, plus tied keys (alias -> primary key)."""

    shards: dict[str, list[TensorShard]]
    aliases: dict[str, str] = field(default_factory=dict)
    #: prefixes a checkpoint key may carry or lack (a base-model checkpoint loaded into a model with a head)
    prefixes: tuple[str, ...] = ()
    #: checkpoint key -> model key renaming (Hugging Face's legacy names, e.g. GPT-NeoX's ``embed_out``)
    rename: Callable[[str], str] | None = None


@dataclass
class LoadStats:
    """What one rank read: bytes of slices, bytes of the full tensors they came from, split tensors apart."""

    files: int = 0
    tensors: int = 0
    bytes_read: int = 0
    bytes_full: int = 0
    split_bytes_read: int = 0
    split_bytes_full: int = 0
    seconds: float = 0.0
    unexpected_keys: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for logs and benchmarks."""
        return {k: v for k, v in self.__dict__.items() if k != "unexpected_keys"} | {
            "unexpected_keys": len(self.unexpected_keys)}


# -- checkpoint description -> ordered file list -------------------------------------------------------------------
def resolve_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any], base_dir: str = "") -> list[Path]:
    """The weight files of ``checkpoint``, in load order.

    ``checkpoint`` is a JSON description (a path to a ``.json`` file or a dict)
    ``{"type": ..., "checkpoints": [files...], "version": 1.0}`` whose file names are relative to ``base_dir``
    (or absolute), a Hugging Face model directory (``model.safetensors``, ``model.safetensors.index.json`` with
    its shards, or ``pytorch_model*.bin``), or a single weight file.
    """
    if isinstance(checkpoint, Mapping):
        return _from_description(checkpoint, base_dir, "the checkpoint dict")
    path = Path(checkpoint)
    if not path.is_absolute() and base_dir and not path.exists():
        path = Path(base_dir) / path
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not exist; pass a Hugging Face model directory, "
                              "a weight file, or a checkpoints JSON description (and base_dir for relative names)")
    if path.is_dir():
        return _from_directory(path)
    if path.suffix == ".json":
        try:
            description = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint description {path} is not valid JSON ({exc}); write "
                                  '{"type": "...", "checkpoints": ["file1", ...], "version": 1.0}') from None
        if "weight_map" in description:  # a safetensors index passed directly
            return _from_directory(path.parent, index=path)
        return _from_description(description, base_dir or str(path.parent), str(path))
    return [_existing(path, str(path))]


def _from_description(description: Mapping[str, Any], base_dir: str, what: str) -> list[Path]:
    files = description.get("checkpoints")
    if not isinstance(files, list) or not files:
        raise CheckpointError(f"{what} has no 'checkpoints' list of files; write "
                              '{"type": "...", "checkpoints": ["file1", ...], "version": 1.0}')
    base = Path(description.get("base_dir") or base_dir or ".")
    return [_existing(Path(f) if Path(f).is_absolute() else base / f, f"{what} lists {f!r}") for f in files]


def _from_directory(path: Path, index: Path | None = None) -> list[Path]:
    index = index or next((path / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                           if (path / n).exists()), None)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"index {index} is unreadable ({exc!r}); re-save the model with save_pretrained") \
                from None
        return [_existing(path / f, f"index {index.name} lists {f!r}") for f in sorted(set(weight_map.values()))]
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.bin", "*.pt"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"no weight files in {path} (looked for *.safetensors, model.safetensors.index.json, "
                          "pytorch_model*.bin); save the model with save_pretrained(..., safe_serialization=True)")


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{what}, but {path} does not exist; fix the path (relative names are joined to "
                              "base_dir) or restore the missing file")
    return path


# -- safetensors header: validated before any data is touched -----------------------------------------------------
def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """``key -> (dtype, shape, start, end)`` (absolute byte offsets), checked against the file size."""
    size = path.stat().st_size
    fix = "the file is damaged or truncated: re-download it or re-save the model"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file ({size} bytes, no header); {fix}")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path} has a corrupted header (declares {n} header bytes in a {size}-byte "
                                  f"file); {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} has a corrupted header (not valid JSON); {fix}") from None
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            dtype, shape = meta["dtype"], tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: entry {key!r} of the header is malformed; {fix}") from None
        numel = 1
        for s in shape:
            numel *= s
        if dtype not in _ST_DTYPES or end - start != numel * _ST_DTYPES[dtype] or 8 + n + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} ({dtype} {list(shape)}) lies outside the file or has a "
                                  f"wrong size (bytes {start}..{end} of {size - 8 - n}); {fix}")
        out[key] = (dtype, shape, 8 + n + start, 8 + n + end)
    return out


# -- reading files ------------------------------------------------------------------------------------------------
class _SafetensorsReader:
    """Tensors of one safetensors file in data order, through a mapping reopened every ``window`` bytes."""

    def __init__(self, path: Path, window: int) -> None:
        self.path, self.window = path, window
        self.header = read_safetensors_header(path)
        self._ctx: Any = None
        self._file: Any = None
        self._since_open = 0

    def keys(self) -> list[str]:
        return sorted(self.header, key=lambda k: self.header[k][2])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header[key][1]

    def getter(self, key: str) -> Callable[[tuple], torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        _, _, start, end = self.header[key]
        if self._file is not None and self._since_open + (end - start) > self.window and self._since_open:
            self.close()
        if self._file is None:
            try:
                self._ctx = safe_open(str(self.path), framework="pt", device="cpu")
                self._file = self._ctx.__enter__()
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{self.path} cannot be opened ({exc}); re-download or re-save it") from None
        self._since_open += end - start
        piece = self._file.get_slice(key)
        return lambda index: piece[index]

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
        self._ctx = self._file = None
        self._since_open = 0


class _TorchReader:
    """Tensors of a torch pickle (``.bin``), memory-mapped so that slicing reads only the slices."""

    def __init__(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged zip/pickle
            raise CheckpointError(f"{path} cannot be read as a torch checkpoint ({type(exc).__name__}: {exc}); "
                                  "re-download or re-save it") from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        self.state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def getter(self, key: str) -> Callable[[tuple], torch.Tensor]:
        tensor = self.state[key]
        return lambda index: tensor[index]

    def close(self) -> None:
        self.state = {}


def _open(path: Path, window: int) -> Any:
    return _TorchReader(path) if path.suffix in _TORCH_SUFFIXES else _SafetensorsReader(path, window)


# -- materialising one shard --------------------------------------------------------------------------------------
def _materialize(get: Callable[[tuple], torch.Tensor], shard: TensorShard, dtype: torch.dtype | None,
                 device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Read ``shard``'s ranges through ``get`` into one new tensor; returns it, the bytes read and the stored
    element size."""
    dest: torch.Tensor | None = None
    read = itemsize = 0
    pieces = [(slice(None),)] if shard.dim is None else \
        [(slice(None),) * shard.dim + (slice(lo, hi),) for lo, hi in shard.ranges]
    offset = 0
    for index in pieces:
        piece = get(index)
        read += piece.numel() * piece.element_size()
        itemsize = piece.element_size()
        if dest is None:
            floating = piece.is_floating_point()
            out_dtype = dtype if (dtype is not None and floating) else piece.dtype
            dest = torch.empty(shard.local_shape(), dtype=out_dtype, device=device)
        src = piece.t() if shard.transpose else piece
        if shard.dim is None:
            dest.copy_(src)
        else:
            dim = (piece.dim() - 1 - shard.dim) if shard.transpose else shard.dim
            n = src.shape[dim]
            dest.narrow(dim, offset, n).copy_(src)
            offset += n
        del piece, src
    assert dest is not None
    return dest, read, itemsize


def assign(module: nn.Module, name: str, tensor: torch.Tensor, is_buffer: bool = False) -> None:
    """Install ``tensor`` as ``module.<name>`` (a frozen Parameter, keeping tensor-parallel tags, or a buffer)."""
    if is_buffer:
        module._buffers[name] = tensor
        return
    old = module._parameters.get(name)
    new = nn.Parameter(tensor, requires_grad=False)
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if old is not None and hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    module._parameters[name] = new


def _load_key(get: Callable[[tuple], torch.Tensor], key: str, shape: tuple[int, ...], shards: list[TensorShard],
              dtype: torch.dtype | None, device: torch.device, stats: LoadStats) -> None:
    for shard in shards:
        if tuple(shape) != tuple(shard.full_shape):
            raise CheckpointError(f"checkpoint tensor {key!r} has shape {list(shape)} but the model expects "
                                  f"{list(shard.full_shape)}; the checkpoint belongs to a different model config "
                                  "(check hidden size, heads, vocabulary)")
        tensor, nbytes, itemsize = _materialize(get, shard, dtype, device)
        assign(shard.module, shard.name, tensor, shard.is_buffer)
        full = itemsize
        for s in shape:
            full *= s
        stats.bytes_read += nbytes
        stats.bytes_full += full
        if shard.dim is not None:
            stats.split_bytes_read += nbytes
            stats.split_bytes_full += full
    stats.tensors += 1


def _resolver(targets: LoadTargets) -> Callable[[str], str | None]:
    known = set(targets.shards)

    def resolve(key: str) -> str | None:
        candidates = [key] if targets.rename is None else [key, targets.rename(key)]
        for p in targets.prefixes:
            candidates += [f"{p}.{key}", key[len(p) + 1:] if key.startswith(p + ".") else key]
        for c in candidates:
            c = targets.aliases.get(c, c)
            if c in known:
                return c
        return None

    return resolve


def load_checkpoint(files: list[Path], targets: LoadTargets, dtype: torch.dtype | None, device: torch.device,
                    window: int = MAP_WINDOW_BYTES) -> LoadStats:
    """Read this rank's slices of every target from ``files`` (in order); raises if a target stays unloaded."""
    stats, start = LoadStats(), time.perf_counter()
    resolve, done = _resolver(targets), set()
    for path in progress(files, "loading weights", weight=lambda p: p.stat().st_size, unit="B"):
        reader = _open(path, window)
        stats.files += 1
        try:
            for key in reader.keys():
                canonical = resolve(key)
                if canonical is None:
                    stats.unexpected_keys.append(key)
                    continue
                if canonical in done:
                    continue  # a tied duplicate already loaded
                _load_key(reader.getter(key), key, reader.shape(key), targets.shards[canonical], dtype, device,
                          stats)
                done.add(canonical)
        finally:
            reader.close()
    missing = sorted(set(targets.shards) - done)
    if missing:
        raise CheckpointError(f"{len(missing)} model tensors are missing from the checkpoint ({len(files)} files), "
                              f"e.g. {missing[:5]}; pass the complete checkpoint (all shards) of this model")
    stats.seconds = time.perf_counter() - start
    return stats


def load_in_memory(targets: LoadTargets, dtype: torch.dtype | None, device: torch.device) -> LoadStats:
    """Slice every target from its in-memory ``source`` tensor (a model that already holds its weights)."""
    stats, start = LoadStats(), time.perf_counter()
    for key, shards in targets.shards.items():
        source = shards[0].source
        if source is None or source.is_meta:
            raise CheckpointError(f"{key!r} is on the meta device and no checkpoint was given; pass "
                                  "checkpoint=<HF model directory or checkpoints JSON> to init_inference")
        if len(shards) == 1 and shards[0].dim is None and not shards[0].transpose:
            # a replicated tensor: no copy when it already has the dtype and device (nothing was read)
            floating = source.is_floating_point() and dtype is not None
            assign(shards[0].module, shards[0].name, source.to(device=device, dtype=dtype if floating else None),
                   shards[0].is_buffer)
            continue
        _load_key(lambda index, s=source: s[index], key, tuple(source.shape), shards, dtype, device, stats)
    stats.seconds = time.perf_counter() - start
    return stats


def iter_meta(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """``(qualified name, owner, attribute, is_buffer)`` of every tensor still on the meta device."""
    for mod_name, module in model.named_modules():
        for kind, table in ((False, module._parameters), (True, module._buffers)):
            for name, t in table.items():
                if t is not None and t.is_meta:
                    yield (f"{mod_name}.{name}" if mod_name else name), module, name, kind
