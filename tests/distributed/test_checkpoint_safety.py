"""Checkpoint safety on real ranks: a rank SIGKILLed mid-save, corrupted/missing/replaced shards, asynchronous saves.

Fault points come from ``shardwise.checkpoint.safety.FAULT_HOOK``, set inside the rank that should fail.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading

import pytest
import torch

import shardwise
from shardwise.checkpoint import safety
from shardwise.checkpoint.errors import CheckpointError
from tests.dist import run_ranks
from tests.models import mse_loss, rank_batch, tiny_mlp


def _engine(stage: int = 2, **checkpoint):
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 200}}
    if checkpoint:
        cfg["checkpoint"] = checkpoint
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    return engine


def _steps(engine, n: int) -> None:
    rank = engine.topology.coord("dp")
    for _ in range(n):
        x, y = rank_batch(engine.global_steps, rank)
        engine.backward(mse_loss(engine, x, y))
        engine.step()


def _params(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


# -- a rank killed in the middle of a save ------------------------------------------------------------------------
def _save_then_die(save_dir: str) -> None:
    engine = _engine()
    _steps(engine, 2)
    engine.save_checkpoint(save_dir, tag="first")
    _steps(engine, 1)
    if engine.global_rank == 1:  # half-way through writing its shard: header on disk, data not yet
        safety.FAULT_HOOK = lambda point: os.kill(os.getpid(), signal.SIGKILL) if point == "shard-data" else None
    engine.save_checkpoint(save_dir, tag="second")


def _load(save_dir: str, tag: str | None) -> dict:
    engine = _engine()
    try:
        path, _ = engine.load_checkpoint(save_dir, tag=tag)
    except CheckpointError as exc:
        return {"error": str(exc)}
    return {"path": path, "steps": engine.global_steps, "params": _params(engine)}


def _reference(steps: int) -> dict:
    engine = _engine()
    _steps(engine, steps)
    return _params(engine)


def test_sigkill_during_save_leaves_latest_on_the_previous_checkpoint(tmp_path) -> None:
    with pytest.raises(AssertionError, match="gave no result"):
        run_ranks(_save_then_die, str(tmp_path))
    assert (tmp_path / "latest").read_text() == "first"
    assert not (tmp_path / "second" / "manifest.json").exists()
    loaded = run_ranks(_load, str(tmp_path), None)
    reference = run_ranks(_reference, 2)
    for rank in range(2):
        assert loaded[rank]["path"].endswith("first") and loaded[rank]["steps"] == 2
        for name, value in reference[rank].items():
            assert torch.equal(loaded[rank]["params"][name], value), name
    unfinished = run_ranks(_load, str(tmp_path), "second")
    assert all("did not finish" in r["error"] for r in unfinished), unfinished[0]


# -- corrupted, missing and replaced shards -------------------------------------------------------------------------
def _save(save_dir: str, steps: int = 2) -> dict:
    engine = _engine()
    _steps(engine, steps)
    engine.save_checkpoint(save_dir)
    return _params(engine)


def _shard(tag_dir, rank: int):
    return next(p for p in tag_dir.iterdir() if p.name.startswith(f"rank{rank:05d}-"))


def test_corrupted_byte_and_missing_shard_are_clear_errors(tmp_path) -> None:
    run_ranks(_save, str(tmp_path))
    shard = _shard(tmp_path / "global_step2", 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    results = run_ranks(_load, str(tmp_path), None)
    for r in results:  # every rank reports the same error, naming the file
        assert "corrupted" in r["error"] and shard.name in r["error"], r
    shard.unlink()
    results = run_ranks(_load, str(tmp_path), None)
    assert all("missing" in r["error"] and shard.name in r["error"] for r in results), results[0]


class _Payload:
    """Unpickling this creates a file: proof that something executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_in_place_of_a_shard_is_refused_not_executed(tmp_path) -> None:
    run_ranks(_save, str(tmp_path))
    tag_dir = tmp_path / "global_step2"
    marker = tmp_path / "EXECUTED"
    shard = _shard(tag_dir, 0)
    shard.write_bytes(pickle.dumps({"module": _Payload(str(marker))}))
    # the attacker also fixes the manifest's size and checksum, so only the format check stands in the way
    manifest = json.loads((tag_dir / "manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["name"] == shard.name)
    entry["bytes"], entry["sha256"] = shard.stat().st_size, safety.sha256_file(str(shard))
    (tag_dir / "manifest.json").write_text(json.dumps(manifest))
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Payload(str(marker))))
    results = run_ranks(_load, str(tmp_path), None)
    assert all("not a valid safetensors file" in r["error"] and shard.name in r["error"] for r in results), results
    assert not marker.exists()


# -- asynchronous save -------------------------------------------------------------------------------------------
def _async_save(save_dir: str) -> dict:
    engine = _engine(async_save=True)
    _steps(engine, 2)
    expected = _params(engine)
    release = threading.Event()
    writer_started = threading.Event()

    def hold(point: str) -> None:  # keep the writer thread inside the save until training has moved on
        if point == "shard-data" and threading.current_thread() is not threading.main_thread():
            writer_started.set()
            assert release.wait(timeout=30)

    safety.FAULT_HOOK = hold
    engine.save_checkpoint(save_dir)
    assert writer_started.wait(timeout=30)
    in_flight = not os.path.exists(os.path.join(save_dir, "latest"))
    _steps(engine, 1)  # training continues while the writer is blocked; the snapshot must not see this step
    changed = not all(torch.equal(v, expected[k]) for k, v in _params(engine).items())
    release.set()
    shardwise.checkpoint.wait_for_checkpoint(engine)
    committed = os.path.exists(os.path.join(save_dir, "global_step2", "manifest.json"))
    return {"expected": expected, "in_flight": in_flight, "changed": changed, "committed": committed}


def test_async_save_snapshots_and_commits_after_the_step_continues(tmp_path) -> None:
    saved = run_ranks(_async_save, str(tmp_path))
    assert all(r["in_flight"] and r["changed"] for r in saved)
    assert saved[0]["committed"] and (tmp_path / "latest").read_text() == "global_step2"
    loaded = run_ranks(_load, str(tmp_path), None)
    for rank in range(2):
        for name, value in saved[rank]["expected"].items():
            assert torch.equal(loaded[rank]["params"][name], value), name


def _async_failure(save_dir: str) -> str:
    engine = _engine(async_save=True)
    _steps(engine, 1)
    if engine.global_rank == 1:
        def fail(point: str) -> None:
            if point == "shard-data":
                raise OSError("disk full (simulated)")
        safety.FAULT_HOOK = fail
    engine.save_checkpoint(save_dir)
    _steps(engine, 1)
    try:
        shardwise.checkpoint.wait_for_checkpoint(engine)
    except CheckpointError as exc:
        return str(exc)
    return "no error"


def test_async_save_failure_is_raised_on_wait_and_nothing_is_committed(tmp_path) -> None:
    errors = run_ranks(_async_failure, str(tmp_path))
    assert "disk full" in errors[1]
    assert "rank 1 failed" in errors[0]
    assert not (tmp_path / "latest").exists() and not (tmp_path / "global_step1" / "manifest.json").exists()
