"""``zero_to_fp32``: merge a checkpoint's shards into one full fp32 state dict, offline, in one process.

DeepSpeed's function names and arguments are kept (``get_fp32_state_dict_from_zero_checkpoint``,
``convert_zero_checkpoint_to_fp32_state_dict``, ``load_state_dict_from_zero_checkpoint``), and the console script
``shardwise-to-fp32 CHECKPOINT_DIR OUTPUT [--tag TAG] [--max_shard_size 5GB] [--exclude_frozen_parameters]``
replaces ``zero_to_fp32.py`` (a stub of that name is also written next to every checkpoint). Works for any layout
that saved the checkpoint (ZeRO stage, data/tensor-parallel size), because pieces are assembled from the manifest.

Output: safetensors always (never pickle): ``OUTPUT/model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (Hugging Face's layout) when larger than ``max_shard_size``; an OUTPUT ending in
``.safetensors`` is a file name. Trainable parameters come from the fp32 master weights; other floating-point
parameters are cast to fp32; buffers keep their dtype. Tied weights appear under every name, as in
``module.state_dict()``. Memory: the writer streams; one full tensor (plus its cast) is held at a time.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch

from shardwise.checkpoint import regions
from shardwise.checkpoint.errors import CheckpointCorruptError, CheckpointError, CheckpointIncompleteError
from shardwise.checkpoint.files import (
    MANIFEST,
    WEIGHT_KINDS,
    CheckpointReader,
    TensorSpec,
    dtype_from_name,
    read_latest,
    write_safetensors,
)
from shardwise.checkpoint.safety import atomic_write_json
from shardwise.common.progress import progress

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (GB = 10**9, GiB = 2**30, as Hugging Face), ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size {size!r} is not a size; write e.g. '5GB', '500MB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def open_checkpoint(checkpoint_dir: str, tag: str | None = None, verify: bool = True) -> CheckpointReader:
    """The committed checkpoint in ``checkpoint_dir`` (tag from ``latest`` unless given; a tag directory also works)."""
    checkpoint_dir = str(checkpoint_dir)
    if tag is None and os.path.isfile(os.path.join(checkpoint_dir, MANIFEST)):
        tag_dir = checkpoint_dir
    else:
        tag = tag if tag is not None else read_latest(checkpoint_dir)
        if tag is None:
            raise CheckpointIncompleteError(f"no 'latest' file in {checkpoint_dir}: pass --tag (e.g. global_step100) "
                                            "or the tag directory itself")
        tag_dir = os.path.join(checkpoint_dir, str(tag))
    reader = CheckpointReader(tag_dir)
    if verify:
        errors = reader.verify()
        if errors:
            raise CheckpointCorruptError("; ".join(errors))
    return reader


class _Entry:
    """One output tensor: where it comes from and what it becomes."""

    def __init__(self, reader: CheckpointReader, name: str, source: str) -> None:
        meta = reader.tensors[source]
        self.name, self.source, self.reader = name, source, reader
        self.shape = tuple(meta["shape"])
        saved = dtype_from_name(meta["dtype"])
        self.kind = reader.kind_of(source, WEIGHT_KINDS if meta["kind"] == "param" else ("value", "fp32", "model"))
        self.dtype = torch.float32 if meta["kind"] == "param" and saved.is_floating_point else saved

    def load(self) -> torch.Tensor:
        return self.reader.read(self.source, self.kind, dtype=self.dtype).view(self.shape)


def _entries(reader: CheckpointReader, exclude_frozen: bool) -> list[_Entry]:
    out, names = [], list(reader.tensors)
    for name, target in reader.manifest.get("aliases", {}).items():
        if target in reader.tensors:
            names.append(name)
    for name in names:
        source = reader.resolve(name)
        meta = reader.tensors[source]
        if exclude_frozen and meta["kind"] == "param" and not meta.get("trainable", True):
            continue
        out.append(_Entry(reader, name, source))
    return out


class LazyTensor:
    """A consolidated tensor read on demand (``lazy_mode=True``); ``.contiguous()`` materialises it."""

    def __init__(self, entry: _Entry) -> None:
        self._entry = entry
        self.shape = torch.Size(entry.shape)
        self.dtype = entry.dtype

    def contiguous(self) -> torch.Tensor:
        """The full tensor."""
        return self._entry.load()

    def __repr__(self) -> str:
        return f"LazyTensor({self._entry.name}, shape={tuple(self.shape)}, dtype={self.dtype})"


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir: str, tag: str | None = None,
                                             exclude_frozen_parameters: bool = False,
                                             lazy_mode: bool = False) -> dict[str, Any]:
    """The full fp32 state dict of a checkpoint, in memory (``lazy_mode``: tensors load on ``.contiguous()``)."""
    reader = open_checkpoint(checkpoint_dir, tag)
    entries = _entries(reader, exclude_frozen_parameters)
    if lazy_mode:
        return {e.name: LazyTensor(e) for e in entries}
    out: dict[str, Any] = {}
    loaded: dict[str, torch.Tensor] = {}
    for e in progress(entries, f"consolidating {checkpoint_dir}"):
        if e.source not in loaded:
            loaded[e.source] = e.load()
        out[e.name] = loaded[e.source]  # tied names share one tensor, as in module.state_dict()
    reader.close()
    return out


def _plan(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        n = regions.box_numel(regions.full_box(e.shape)) * torch.empty((), dtype=e.dtype).element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir: str, output_dir: str,
                                               max_shard_size: int | str = "5GB", safe_serialization: bool = False,
                                               tag: str | None = None,
                                               exclude_frozen_parameters: bool = False) -> list[str]:
    """Write the consolidated fp32 state dict as safetensors (see the module docstring); returns the files written.

    ``safe_serialization`` is accepted for DeepSpeed compatibility; output is safetensors either way.
    """
    reader = open_checkpoint(checkpoint_dir, tag)
    entries = _entries(reader, exclude_frozen_parameters)
    output_dir = str(output_dir)
    if output_dir.endswith(".safetensors"):
        directory = os.path.dirname(os.path.abspath(output_dir))
        stem = os.path.basename(output_dir)[: -len(".safetensors")]
    else:
        directory, stem = output_dir, "model"
    os.makedirs(directory, exist_ok=True)
    shards = _plan(entries, parse_size(max_shard_size))
    names = [f"{stem}.safetensors"] if len(shards) == 1 else \
        [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written, weight_map, total = [], {}, 0
    for name, shard in zip(names, shards):
        specs = [TensorSpec(e.name, e.dtype, e.shape, e.load) for e in shard]
        path = os.path.join(directory, name)
        write_safetensors(path, specs, {"format": "pt"})
        written.append(path)
        for e, s in zip(shard, specs):
            weight_map[e.name] = name
            total += s.nbytes
    if len(shards) > 1:
        index = os.path.join(directory, f"{stem}.safetensors.index.json")
        atomic_write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(index)
    reader.close()
    return written


def load_state_dict_from_zero_checkpoint(model: torch.nn.Module, checkpoint_dir: str,
                                         tag: str | None = None) -> torch.nn.Module:
    """Move ``model`` to the CPU and load the checkpoint's consolidated fp32 weights into it (non-strict)."""
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    model.load_state_dict(state, strict=False)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """``shardwise-to-fp32 CHECKPOINT_DIR OUTPUT [--tag] [--max_shard_size] [--exclude_frozen_parameters]``."""
    parser = argparse.ArgumentParser(prog="shardwise-to-fp32", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", help="the save directory (holding `latest`), or one tag directory")
    parser.add_argument("output", help="output directory (model.safetensors [+ index]) or a .safetensors file")
    parser.add_argument("-t", "--tag", default=None, help="checkpoint tag (default: the one in `latest`)")
    parser.add_argument("--max_shard_size", default="5GB", help="split the output above this size (default 5GB)")
    parser.add_argument("--exclude_frozen_parameters", action="store_true", help="leave out frozen parameters")
    parser.add_argument("--safe_serialization", action="store_true", help="accepted; output is always safetensors")
    parser.add_argument("-d", "--debug", action="store_true", help="accepted for compatibility")
    args = parser.parse_args(argv)
    try:
        files = convert_zero_checkpoint_to_fp32_state_dict(args.checkpoint_dir, args.output, args.max_shard_size,
                                                           tag=args.tag,
                                                           exclude_frozen_parameters=args.exclude_frozen_parameters)
    except (CheckpointError, ValueError, OSError) as exc:  # a damaged checkpoint, a bad size, an unwritable output
        text = str(exc) if isinstance(exc, (CheckpointError, ValueError)) else f"{exc.filename or ''}: {exc.strerror}"
        print(f"shardwise-to-fp32: error: {' '.join(text.split())}", file=sys.stderr)
        return 1
    print(f"wrote {len(files)} file(s): {', '.join(files)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
