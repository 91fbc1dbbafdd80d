"""The on-disk format without any engine: safetensors writer, piece math, manifest merge, reading in other layouts,
and every way a checkpoint directory can be damaged or hostile."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors import safe_open

from shardwise.checkpoint import regions
from shardwise.checkpoint.errors import CheckpointCorruptError, CheckpointError, CheckpointIncompleteError
from shardwise.checkpoint.files import (
    CheckpointReader,
    TensorSpec,
    build_manifest,
    read_latest,
    stale_files,
    write_safetensors,
)
from shardwise.checkpoint.safety import atomic_file, atomic_write_json, sha256_file


def test_writer_output_is_standard_safetensors(tmp_path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(5),
               "d": torch.tensor([True, False]), "e": torch.tensor(2.5, dtype=torch.float16), "f": torch.empty(0)}
    path = str(tmp_path / "x.safetensors")
    info = write_safetensors(path, [TensorSpec.of(k, v) for k, v in tensors.items()], {"format": "pt"})
    assert info["bytes"] == os.path.getsize(path) and info["sha256"] == sha256_file(path)
    header_len = struct.unpack("<Q", open(path, "rb").read(8))[0]
    assert header_len % 8 == 0
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for key, value in tensors.items():
            assert torch.equal(f.get_tensor(key), value), key
        assert torch.equal(f.get_slice("b")[2:5], tensors["b"][2:5])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_atomic_file_leaves_the_old_file_on_failure(tmp_path) -> None:
    path = tmp_path / "latest"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(str(path)) as f:
        f.write(b"new but incomplete")
        raise RuntimeError("crash")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["latest"]


def test_region_math() -> None:
    assert regions.overlap((0, 5), (5, 9)) is None and regions.overlap((2, 8), (5, 9)) == (5, 8)
    assert regions.intersect_boxes(((0, 4), (0, 3)), ((2, 6), (1, 9))) == ((2, 4), (1, 3))
    assert regions.intersect_boxes(((0, 2),), ((2, 4),)) is None
    assert regions.normalize_box(None, (2, 3)) == ((0, 2), (0, 3))
    assert regions.split_even(12, 3, 2) == (8, 12)
    with pytest.raises(ValueError):
        regions.normalize_box([[0, 5]], (4,))
    with pytest.raises(ValueError):
        regions.split_even(10, 3, 0)


# -- synthetic checkpoints -------------------------------------------------------------------------------------------
def _flat_pieces(full: torch.Tensor, cuts: list[int]) -> list[tuple[tuple[int, int], torch.Tensor]]:
    flat = full.reshape(-1)
    return [((a, b), flat[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def write_checkpoint(tag_dir, per_rank: list[dict], extra: dict | None = None) -> dict:
    """``per_rank[r] = {name: (full_shape, dtype, [(kind, (start, end), values, box)])}`` -> a committed manifest."""
    os.makedirs(tag_dir, exist_ok=True)
    indexes = []
    for rank, tensors in enumerate(per_rank):
        specs, entries = [], {}
        for name, (shape, dtype, pieces) in tensors.items():
            entry = {"shape": list(shape), "dtype": dtype, "kind": "param", "trainable": True, "dtypes": {},
                     "pieces": {}}
            for kind, (a, b), values, box in pieces:
                key = f"{kind}/{name}#{len(entry['pieces'].get(kind, []))}"
                specs.append(TensorSpec.of(key, values.contiguous()))
                piece = {"key": key, "flat": [a, b]} | ({"box": [list(x) for x in box]} if box else {})
                entry["pieces"].setdefault(kind, []).append(piece)
                entry["dtypes"][kind] = str(values.dtype).removeprefix("torch.")
            entries[name] = entry
        name = f"rank{rank:05d}-00000000.safetensors"
        info = write_safetensors(os.path.join(tag_dir, name), specs)
        indexes.append({"rank": rank, "file": {"name": name, **info}, "tensors": entries,
                        "global": {"layout": {"world_size": len(per_rank)}, **(extra or {})} if rank == 0 else {}})
    manifest = build_manifest(indexes, tag=os.path.basename(tag_dir), save_id="00000000")
    atomic_write_json(os.path.join(tag_dir, "manifest.json"), manifest)
    return manifest


def test_reader_reshards_flat_pieces_across_files(tmp_path) -> None:
    w = torch.randn(6, 5)
    p = _flat_pieces(w, [0, 7, 19, 30])
    write_checkpoint(tmp_path / "t", [{"w": ((6, 5), "float32", [("fp32", *p[0], None), ("fp32", *p[2], None)])},
                                      {"w": ((6, 5), "float32", [("fp32", *p[1], None)])}])
    reader = CheckpointReader(str(tmp_path / "t"))
    assert reader.verify() == []
    assert torch.equal(reader.read("w", "fp32"), w)
    for lo, hi in [(0, 30), (3, 9), (7, 19), (18, 21), (29, 30)]:
        assert torch.equal(reader.read("w", "fp32", flat=(lo, hi)), w.reshape(-1)[lo:hi]), (lo, hi)
    assert reader.read("w", "fp32", flat=(2, 4), dtype=torch.float64).dtype == torch.float64


def test_reader_moves_between_tensor_parallel_boxes(tmp_path) -> None:
    """Saved as 2 tensor-parallel column blocks, each ZeRO-split in two; read as full, as row blocks, as ranges."""
    w = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    ranks = []
    for cols in [(0, 3), (3, 6)]:
        block = w[:, cols[0] : cols[1]].reshape(-1)
        box = ((0, 4), cols)
        for lo, hi in [(0, 5), (5, 12)]:
            ranks.append({"w": ((4, 6), "float32", [("fp32", (lo, hi), block[lo:hi], box)])})
    write_checkpoint(tmp_path / "t", ranks)
    reader = CheckpointReader(str(tmp_path / "t"))
    assert torch.equal(reader.read("w", "fp32"), w)
    rows = ((2, 4), (0, 6))
    assert torch.equal(reader.read("w", "fp32", box=rows), w[2:4])
    assert torch.equal(reader.read("w", "fp32", box=rows, flat=(3, 10)), w[2:4].reshape(-1)[3:10])
    cols = ((0, 4), (2, 5))
    assert torch.equal(reader.read("w", "fp32", box=cols), w[:, 2:5])


def test_missing_coverage_is_refused_at_commit_and_at_read(tmp_path) -> None:
    w = torch.randn(10)
    with pytest.raises(CheckpointError, match="cover 6 of 10 elements"):
        write_checkpoint(tmp_path / "t", [{"w": ((10,), "float32", [("fp32", (0, 6), w[:6], None)])}])
    write_checkpoint(tmp_path / "u", [{"w": ((10,), "float32", [("fp32", (0, 10), w, None)])}])
    reader = CheckpointReader(str(tmp_path / "u"))
    with pytest.raises(CheckpointError, match="no 'optim.exp_avg' values"):
        reader.read("w", "optim.exp_avg")


def test_identical_pieces_from_two_ranks_are_kept_once(tmp_path) -> None:
    """A weight held by two pipeline stages (tied embeddings) is written by both; the manifest keeps one copy."""
    w = torch.randn(8)
    same = {"w": ((8,), "float32", [("value", (0, 8), w, None)])}
    manifest = write_checkpoint(tmp_path / "t", [same, same])
    assert len(manifest["tensors"]["w"]["pieces"]["value"]) == 1
    with pytest.raises(CheckpointError, match="disagree on the shape"):
        write_checkpoint(tmp_path / "u", [same, {"w": ((2, 4), "float32", [("value", (0, 8), w, None)])}])


# -- damaged and hostile directories ---------------------------------------------------------------------------------
def _simple(tmp_path):
    w = torch.randn(64)
    write_checkpoint(tmp_path / "t", [{"w": ((64,), "float32", [("fp32", (0, 32), w[:32], None)])},
                                      {"w": ((64,), "float32", [("fp32", (32, 64), w[32:], None)])}])
    return tmp_path / "t", w


def test_flipped_byte_truncation_and_missing_file_name_the_file(tmp_path) -> None:
    tag, w = _simple(tmp_path)
    shard = tag / "rank00001-00000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    errors = CheckpointReader(str(tag)).verify()
    assert len(errors) == 1 and "rank00001-00000000.safetensors is corrupted" in errors[0]
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(CheckpointCorruptError, match="rank00001.*truncated"):
        CheckpointReader(str(tag)).read("w", "fp32")
    shard.unlink()
    assert "is missing" in CheckpointReader(str(tag)).verify()[0]
    assert torch.equal(CheckpointReader(str(tag)).read("w", "fp32", flat=(0, 32)), w[:32])  # rank 0's part reads


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickles_are_never_executed(tmp_path) -> None:
    marker = tmp_path / "EXECUTED"
    # (1) a pickle in place of a shard, manifest adjusted to match it
    tag, _ = _simple(tmp_path)
    shard = tag / "rank00000-00000000.safetensors"
    shard.write_bytes(pickle.dumps(_Payload(str(marker))))
    manifest = json.loads((tag / "manifest.json").read_text())
    manifest["files"][0].update(bytes=shard.stat().st_size, sha256=sha256_file(str(shard)))
    (tag / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorruptError, match="rank00000-00000000.safetensors is not a valid safetensors"):
        CheckpointReader(str(tag)).read("w", "fp32")
    # (2) a DeepSpeed-style directory of pickles
    ds = tmp_path / "ds" / "global_step1"
    ds.mkdir(parents=True)
    (ds / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointIncompleteError, match="looks like a DeepSpeed checkpoint"):
        CheckpointReader(str(ds))
    # (3) a manifest that is a pickle
    (tag / "manifest.json").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointCorruptError, match="not valid JSON"):
        CheckpointReader(str(tag))
    assert not marker.exists()


def test_unfinished_and_foreign_directories(tmp_path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "rank00000-0badcafe.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointIncompleteError, match="did not finish"):
        CheckpointReader(str(tmp_path / "half"))
    with pytest.raises(CheckpointIncompleteError, match="does not exist"):
        CheckpointReader(str(tmp_path / "nope"))
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointIncompleteError, match="not a shardwise checkpoint"):
        CheckpointReader(str(tmp_path / "other"))
    half = tmp_path / "half"
    assert stale_files(str(half), "12345678") == [str(half / "rank00000-0badcafe.safetensors")]
    assert stale_files(str(tmp_path / "half"), "0badcafe") == []


def test_latest_files(tmp_path) -> None:
    assert read_latest(str(tmp_path)) is None
    (tmp_path / "latest").write_text("global_step5\n")
    (tmp_path / "latest_universal").write_text("uni")
    assert read_latest(str(tmp_path)) == "global_step5"
    assert read_latest(str(tmp_path), universal=True) == "uni"


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_local_runs_map_any_range_of_a_fused_local_tensor_to_its_boxes(dim: int) -> None:
    """A rank holding blocks [1, 3) and [5, 8) of dimension ``dim`` (fused parts, uneven): every flat range of its
    local tensor maps to box ranges whose values are exactly the full tensor's."""
    from shardwise.checkpoint.model_view import run_view

    full = torch.arange(3 * 9 * 4, dtype=torch.float32).reshape([3, 9, 4] if dim == 1 else
                                                                  [9, 3, 4] if dim == 0 else [3, 4, 9])
    boxes = []
    for lo, hi in [(1, 3), (5, 8)]:
        box = list(regions.full_box(full.shape))
        box[dim] = (lo, hi)
        boxes.append(tuple(box))
    blocks = [full[tuple(slice(a, b) for a, b in box)] for box in boxes]
    local = torch.cat(blocks, dim=dim).reshape(-1)
    n = local.numel()
    for s, e in [(0, n), (0, 7), (3, 29), (5, 6), (11, n), (n - 1, n), (4, 40)]:
        seen = torch.zeros(e - s, dtype=torch.int32)
        for run in regions.local_runs(boxes, dim, (s, e)):
            got = run_view(local[s:e], run).reshape(-1)
            lo, hi = run.box_range
            assert torch.equal(got, blocks[run.box].reshape(-1)[lo:hi]), (s, e, run)
            run_view(seen, run).add_(1)
        assert torch.equal(seen, torch.ones_like(seen)), (s, e)  # every element exactly once
        assert len(regions.local_runs(boxes, dim, (s, e))) <= 3 * len(boxes)
