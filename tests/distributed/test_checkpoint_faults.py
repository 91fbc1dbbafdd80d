"""Checkpoint faults on 2 real ranks: every damaged checkpoint or bad argument raises the same clear error on every
rank (no rank left waiting in a collective: the harness timeout bounds each test), and the temporaries of a save killed
by SIGKILL are removed by the next save."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

import shardwise
from shardwise.checkpoint import safety
from shardwise.checkpoint.errors import CheckpointArgumentError, CheckpointError
from tests.dist import run_ranks
from tests.models import mse_loss, rank_batch, tiny_mlp

RAW_TYPES = re.compile(r"\b(IndexError|KeyError|TypeError|ValueError|AttributeError|RecursionError)\b")


def _engine(**checkpoint):
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": 1}}
    if checkpoint:
        cfg["checkpoint"] = checkpoint
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    return engine


def _train_and_save(save_dir: str, tags: list[str], **checkpoint) -> None:
    engine = _engine(**checkpoint)
    for tag in tags:
        x, y = rank_batch(engine.global_steps, engine.global_rank)
        engine.backward(mse_loss(engine, x, y))
        engine.step()
        engine.save_checkpoint(save_dir, tag=tag)
    engine.destroy()


def _load_each(save_dir: str, cases: list[str]) -> list[tuple[str, str, str]]:
    """Every rank: load each case directory; (case, outcome class, message)."""
    engine = _engine()
    out = []
    for case in cases:
        try:
            path, _ = engine.load_checkpoint(os.path.join(save_dir, case))
            out.append((case, "loaded", str(path)))
        except CheckpointError as exc:
            out.append((case, type(exc).__name__, str(exc)))
    return out


CORRUPTIONS = {
    "file_index": (lambda m: m["tensors"][next(iter(m["tensors"]))]["pieces"]["fp32"][0].update(file=5),
                   r"pieces\['fp32'\]\[0\]\.file = 5"),
    "global_steps_abc": (lambda m: m["engine"].update(global_steps="abc"), r"engine\.global_steps = 'abc'"),
    "escaping_name": (lambda m: m["files"][0].update(name="../../outside.safetensors"), r"files\[0\]\.name"),
    "absolute_name": (lambda m: m["files"][1].update(name="/etc/passwd"), r"files\[1\]\.name = '/etc/passwd'"),
    "scaler_state": (lambda m: m["scaler"].update(state={"overflows": "many"}), r"saved loss scaler state"),
    "rng_missing": (lambda m: m["ranks"][1].update(rng=None), r"no RNG state for rank 1"),
}


def test_damaged_checkpoints_fail_on_every_rank_with_the_field_named(tmp_path: Path) -> None:
    run_ranks(_train_and_save, str(tmp_path / "good"), ["t"])
    cases = []
    for name, (edit, _) in CORRUPTIONS.items():
        case = tmp_path / name
        case.mkdir()
        (case / "latest").write_text("t")
        os.makedirs(case / "t")
        for f in (tmp_path / "good" / "t").iterdir():
            (case / "t" / f.name).write_bytes(f.read_bytes())
        manifest = json.loads((case / "t" / "manifest.json").read_text())
        edit(manifest)
        (case / "t" / "manifest.json").write_text(json.dumps(manifest))
        cases.append(name)
    empty = tmp_path / "empty_latest"
    empty.mkdir()
    (empty / "latest").write_text("")
    cases.append("empty_latest")
    results = run_ranks(_load_each, str(tmp_path), cases, timeout=120)
    assert results[0] == results[1]  # the same outcome, class and text on both ranks
    for case, kind, text in results[0]:
        assert kind in ("CheckpointCorruptError", "CheckpointError"), (case, kind, text)
        assert not RAW_TYPES.search(text), (case, text)
        pattern = CORRUPTIONS[case][1] if case in CORRUPTIONS else r"latest is empty"
        assert re.search(pattern, text), (case, text)


def _save_with_bad_args(save_dir: str) -> list[str]:
    engine = _engine()
    x, y = rank_batch(0, engine.global_rank)
    engine.backward(mse_loss(engine, x, y))
    engine.step()
    out = []
    for kwargs in ({"save_dir": None}, {"save_dir": ""},
                   {"save_dir": save_dir, "tag": "a/b" if engine.global_rank == 1 else "ok"}):
        try:
            engine.save_checkpoint(**kwargs)
            out.append("saved")
        except CheckpointArgumentError as exc:
            assert isinstance(exc, ValueError)  # DeepSpeed raises ValueError for save_dir=None
            out.append(str(exc))
    for load_dir in (None, ""):
        try:
            engine.load_checkpoint(load_dir)
            out.append("loaded")
        except CheckpointError as exc:
            out.append(str(exc))
    engine.save_checkpoint(save_dir, tag="after")  # the ranks are still in step: a normal save works
    return out


def test_bad_save_and_load_arguments_raise_on_every_rank(tmp_path: Path) -> None:
    r0, r1 = run_ranks(_save_with_bad_args, str(tmp_path), timeout=60)
    assert r0 == r1 and len(r0) == 5
    assert "save_dir must be a non-empty directory path, got None" in r0[0]
    assert "got ''" in r0[1]
    assert "rank 1: checkpoint tag 'a/b' is not a plain directory name" in r0[2]  # only rank 1 passed it
    assert "load_dir must be a non-empty directory path" in r0[3] and "load_dir" in r0[4]
    assert (tmp_path / "latest").read_text() == "after" and not (tmp_path / "ok").exists()


# -- killed saves: their temporaries are removed by the next save -------------------------------------------------
def _save_then_die(save_dir: str, async_save: bool) -> None:
    engine = _engine(async_save=async_save)
    x, y = rank_batch(0, engine.global_rank)
    engine.backward(mse_loss(engine, x, y))
    engine.step()
    engine.save_checkpoint(save_dir, tag="first")
    shardwise.checkpoint.wait_for_checkpoint(engine)
    if engine.global_rank == 1:  # half-way through its shard: header written, data not
        safety.FAULT_HOOK = lambda point: os.kill(os.getpid(), signal.SIGKILL) if point == "shard-data" else None
    engine.save_checkpoint(save_dir, tag="second")
    shardwise.checkpoint.wait_for_checkpoint(engine)


def _temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".tmp-*"))


@pytest.mark.parametrize("async_save", [False, True])
def test_temporaries_of_a_killed_save_are_removed_by_the_next_save(tmp_path: Path, async_save: bool) -> None:
    with pytest.raises(AssertionError, match="gave no result"):
        run_ranks(_save_then_die, str(tmp_path), async_save, timeout=60)
    left = _temporaries(tmp_path)
    assert left and all(name.startswith("second/") for name in left), left  # the killed rank's partial shard
    assert (tmp_path / "latest").read_text() == "first"
    run_ranks(_train_and_save, str(tmp_path), ["third"], timeout=60)
    assert _temporaries(tmp_path) == []
    assert (tmp_path / "latest").read_text() == "third" and (tmp_path / "first" / "manifest.json").exists()
