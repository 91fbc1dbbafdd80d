"""The commit protocol and offline consolidation, single process: ranks are simulated by separate ``SaveJob``s."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from shardwise.checkpoint import safety
from shardwise.checkpoint.collect import RankSnapshot
from shardwise.checkpoint.commit import SaveJob
from shardwise.checkpoint.consolidate import (
    convert_zero_checkpoint_to_fp32_state_dict,
    get_fp32_state_dict_from_zero_checkpoint,
    main,
    parse_size,
)
from shardwise.checkpoint.errors import CheckpointError, CheckpointIncompleteError
from shardwise.checkpoint.files import CheckpointReader, failure_marker_name

W = torch.arange(12, dtype=torch.float32).reshape(3, 4)


def _snapshot(rank: int, w: torch.Tensor, world: int = 2) -> RankSnapshot:
    """Rank ``rank``'s half of ``w`` (fp32 + bf16 + Adam state), rank 0 also a buffer, an alias and a frozen weight."""
    n = w.numel() // world
    lo, hi = rank * n, (rank + 1) * n
    snap = RankSnapshot()
    entry = {"shape": list(w.shape), "dtype": "bfloat16", "kind": "param", "trainable": True, "dtypes": {},
             "pieces": {}}
    for kind, value in (("fp32", w), ("model", w.to(torch.bfloat16)), ("optim.exp_avg", w * 0.1)):
        snap.add(f"{kind}/w", value.reshape(-1)[lo:hi], copy=True)
        entry["pieces"][kind] = [{"key": f"{kind}/w", "flat": [lo, hi]}]
        entry["dtypes"][kind] = str(value.dtype).removeprefix("torch.")
    frozen = {"shape": [2], "dtype": "bfloat16", "kind": "param", "trainable": False, "dtypes": {}, "pieces": {}}
    buf = {"shape": [3], "dtype": "int64", "kind": "buffer", "trainable": False, "dtypes": {}, "pieces": {}}
    if rank == 0:
        snap.add("value/frozen", torch.tensor([1.5, -2.0], dtype=torch.bfloat16), copy=False)
        frozen["pieces"]["value"] = [{"key": "value/frozen", "flat": [0, 2]}]
        snap.add("value/buf", torch.tensor([4, 5, 6]), copy=False)
        buf["pieces"]["value"] = [{"key": "value/buf", "flat": [0, 3]}]
        snap.index["global"] = {"layout": {"world_size": world}, "engine": {"global_steps": 1}}
    snap.index.update(rank=rank, tensors={"w": entry, "frozen": frozen, "buf": buf},
                      aliases={"w_tied": "w"}, excluded=[])
    return snap


def _save(save_dir, tag: str, w: torch.Tensor = W, save_id: str = "aaaa0000", ranks=(0, 1)) -> SaveJob:
    jobs = [SaveJob(str(save_dir), tag, save_id, r, 2, _snapshot(r, w), save_latest=True) for r in range(2)]
    for r in ranks:
        jobs[r].write_rank_files()
    jobs[0].commit(poll=False)
    return jobs[0]


def test_commit_writes_manifest_then_latest_and_removes_rank_indexes(tmp_path) -> None:
    _save(tmp_path, "step1")
    assert (tmp_path / "latest").read_text() == "step1"
    assert (tmp_path / "zero_to_fp32.py").exists()
    assert sorted(os.listdir(tmp_path / "step1")) == ["manifest.json", "rank00000-aaaa0000.safetensors",
                                                       "rank00001-aaaa0000.safetensors"]
    reader = CheckpointReader(str(tmp_path / "step1"))
    assert reader.verify() == [] and torch.equal(reader.read("w", "fp32"), W)
    assert reader.manifest["engine"] == {"global_steps": 1}


@pytest.mark.parametrize("point", ["shard-data", "shard-written", "rank-written", "before-commit",
                                   "manifest-written"])
def test_a_crash_at_any_point_leaves_latest_on_a_loadable_checkpoint(tmp_path, monkeypatch, point) -> None:
    _save(tmp_path, "step1")

    def crash(name: str) -> None:
        if name == point:
            raise KeyboardInterrupt(f"killed at {name}")

    monkeypatch.setattr(safety, "FAULT_HOOK", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, "step2", W + 100, save_id="bbbb1111")
    monkeypatch.setattr(safety, "FAULT_HOOK", None)
    assert (tmp_path / "latest").read_text() == "step1"
    assert torch.equal(CheckpointReader(str(tmp_path / "step1")).read("w", "fp32"), W)
    assert (tmp_path / "step2" / "manifest.json").exists() == (point == "manifest-written")
    assert not [n for n in os.listdir(tmp_path / "step2") if n.startswith(".tmp-")]  # temporaries cleaned up


def test_resaving_a_tag_swaps_it_atomically(tmp_path, monkeypatch) -> None:
    _save(tmp_path, "step1")
    monkeypatch.setattr(safety, "FAULT_HOOK", lambda n: (_ for _ in ()).throw(OSError(n)) if n == "before-commit"
                        else None)
    with pytest.raises(OSError):
        _save(tmp_path, "step1", W + 1, save_id="bbbb1111")
    assert torch.equal(CheckpointReader(str(tmp_path / "step1")).read("w", "fp32"), W)  # the old copy still loads
    monkeypatch.setattr(safety, "FAULT_HOOK", None)
    _save(tmp_path, "step1", W + 2, save_id="cccc2222")
    assert torch.equal(CheckpointReader(str(tmp_path / "step1")).read("w", "fp32"), W + 2)
    assert all("cccc2222" in n for n in os.listdir(tmp_path / "step1") if n != "manifest.json")


def test_commit_refuses_when_a_rank_is_missing_or_failed(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="rank 1's files .* did not appear"):
        _save(tmp_path, "step1", ranks=(0,))
    job = SaveJob(str(tmp_path), "step2", "dddd3333", 0, 2, _snapshot(0, W), True, commit_timeout=30)
    job.write_rank_files()
    (tmp_path / "step2" / failure_marker_name(1, "dddd3333")).write_text("OSError")
    with pytest.raises(CheckpointError, match="rank 1 failed"):
        job.commit(poll=True)  # returns at once: the marker says rank 1 will never finish
    job.commit_timeout = 0.05
    (tmp_path / "step2" / failure_marker_name(1, "dddd3333")).unlink()
    with pytest.raises(CheckpointError, match="did not appear"):
        job.commit(poll=True)
    assert not (tmp_path / "latest").exists()


def test_consolidation_of_a_synthetic_checkpoint(tmp_path) -> None:
    _save(tmp_path / "ckpt", "step1")
    expected = {"w": W, "w_tied": W, "frozen": torch.tensor([1.5, -2.0]), "buf": torch.tensor([4, 5, 6])}
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"))
    assert state.keys() == expected.keys() and state["w"] is state["w_tied"]
    for k, v in expected.items():
        assert torch.equal(state[k], v) and state[k].dtype == v.dtype, k
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), lazy_mode=True)
    assert torch.equal(lazy["w"].contiguous(), W) and lazy["w"].shape == W.shape
    no_frozen = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"), exclude_frozen_parameters=True)
    assert "frozen" not in no_frozen and "buf" in no_frozen
    files = convert_zero_checkpoint_to_fp32_state_dict(str(tmp_path / "ckpt"), str(tmp_path / "out.safetensors"))
    assert files == [str(tmp_path / "out.safetensors")]
    assert all(torch.equal(load_file(files[0])[k], v) for k, v in expected.items())
    assert main([str(tmp_path / "ckpt"), str(tmp_path / "dir"), "--tag", "step1", "--max_shard_size", "60"]) == 0
    index = json.loads((tmp_path / "dir" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 48 + 48 + 8 + 24 and len(set(index["weight_map"].values())) == 3
    with pytest.raises(CheckpointIncompleteError, match="no 'latest' file"):
        convert_zero_checkpoint_to_fp32_state_dict(str(tmp_path), str(tmp_path / "x"))


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5MiB") == 3 * 2**19 and parse_size(100) == 100
    with pytest.raises(ValueError, match="not a size"):
        parse_size("five")
