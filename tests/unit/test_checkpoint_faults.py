"""Damaged and hostile checkpoints, single process: manifest file names confined to the tag directory, malformed
manifests refused naming the field, an empty ``latest`` is an error, ``shardwise-to-fp32`` fails in one line, and
temporaries of killed saves are removed only when their writer provably no longer runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardwise.checkpoint import stale
from shardwise.checkpoint.consolidate import get_fp32_state_dict_from_zero_checkpoint, main
from shardwise.checkpoint.errors import CheckpointCorruptError
from shardwise.checkpoint.files import CheckpointReader, read_latest
from tests.unit.test_checkpoint_commit import _save

REPO = Path(__file__).resolve().parents[2]


def _edit_manifest(tag_dir: Path, edit) -> None:
    path = tag_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _outside_copy(tmp_path: Path, tag_dir: Path) -> Path:
    """A valid copy of rank 0's shard outside the checkpoint (what an escaping name would point at)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = next(p for p in tag_dir.iterdir() if p.name.startswith("rank00000"))
    (outside / "x.safetensors").write_bytes(shard.read_bytes())
    return outside / "x.safetensors"


@pytest.mark.parametrize("name", ["../../outside/x.safetensors", "ABSOLUTE", "sub/../../outside/x.safetensors",
                                  "..", "", "a\\..\\b"])
def test_manifest_file_names_must_stay_in_the_tag_directory(tmp_path, name) -> None:
    _save(tmp_path / "ckpt", "step1")
    tag_dir = tmp_path / "ckpt" / "step1"
    outside = _outside_copy(tmp_path, tag_dir)
    bad = str(outside) if name == "ABSOLUTE" else name

    def escape(m: dict) -> None:
        m["files"][0]["name"] = bad

    _edit_manifest(tag_dir, escape)
    with pytest.raises(CheckpointCorruptError, match=r"files\[0\]\.name .* file name inside the tag directory"):
        CheckpointReader(str(tag_dir))
    with pytest.raises(CheckpointCorruptError, match=r"files\[0\]\.name"):
        get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"))


def test_a_symbolic_link_out_of_the_tag_directory_is_refused(tmp_path) -> None:
    _save(tmp_path / "ckpt", "step1")
    tag_dir = tmp_path / "ckpt" / "step1"
    outside = _outside_copy(tmp_path, tag_dir)
    shard = next(p for p in tag_dir.iterdir() if p.name.startswith("rank00000"))
    shard.unlink()
    shard.symlink_to(outside)  # same bytes and sha256: only the location is wrong
    errors = CheckpointReader(str(tag_dir)).verify()
    assert len(errors) == 1 and "outside the checkpoint directory" in errors[0]
    with pytest.raises(CheckpointCorruptError, match="outside the checkpoint directory"):
        get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("field,edit", [
    ("files[0].bytes", lambda m: m["files"][0].update(bytes="12")),
    ("files[1].sha256", lambda m: m["files"][1].update(sha256="abc")),
    ("global_file", lambda m: m.update(global_file=7)),
    ("pieces['fp32'][0].file", lambda m: m["tensors"]["w"]["pieces"]["fp32"][0].update(file=9)),
    ("pieces['fp32'][0].flat", lambda m: m["tensors"]["w"]["pieces"]["fp32"][0].update(flat=[0, 10**6])),
    ("tensors['w'].shape", lambda m: m["tensors"]["w"].update(shape=[3, "4"])),
    ("tensors['w'].dtype", lambda m: m["tensors"]["w"].update(dtype="float128")),
    ("ranks[1].file", lambda m: m["ranks"][1].update(file=-1)),
    ("files", lambda m: m.update(files=[])),
])
def test_malformed_manifest_fields_are_named(tmp_path, field, edit) -> None:
    _save(tmp_path, "step1")
    _edit_manifest(tmp_path / "step1", edit)
    with pytest.raises(CheckpointCorruptError, match=r"manifest\.json: .*" + field.replace("[", r"\[")
                       .replace("]", r"\]").replace(".", r"\.") + " = "):
        CheckpointReader(str(tmp_path / "step1"))


def test_manifest_that_is_not_json_or_nested_too_deeply(tmp_path) -> None:
    _save(tmp_path, "step1")
    path = tmp_path / "step1" / "manifest.json"
    path.write_bytes(b"\xff\xfe not json")
    with pytest.raises(CheckpointCorruptError, match="not valid JSON"):
        CheckpointReader(str(tmp_path / "step1"))
    path.write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointCorruptError, match="not valid JSON .nested too deeply"):
        CheckpointReader(str(tmp_path / "step1"))


def test_empty_or_unreadable_latest_is_an_error_not_a_fresh_start(tmp_path) -> None:
    assert read_latest(str(tmp_path)) is None  # no file: nothing saved yet, as DeepSpeed
    (tmp_path / "latest").write_text("  \n")
    with pytest.raises(CheckpointCorruptError, match="latest is empty"):
        read_latest(str(tmp_path))
    (tmp_path / "latest").write_bytes(b"\xff\xfe\xfd")
    with pytest.raises(CheckpointCorruptError, match="cannot be read as a tag name"):
        read_latest(str(tmp_path))


def test_to_fp32_prints_one_line_for_a_corrupt_checkpoint(tmp_path, capsys) -> None:
    _save(tmp_path / "ckpt", "step1")
    shard = next(p for p in (tmp_path / "ckpt" / "step1").iterdir() if p.name.startswith("rank00001"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shardwise-to-fp32: error: ") and "is corrupted: sha256" in err
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
    assert "no 'latest' file" in capsys.readouterr().err
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "shardwise.checkpoint.consolidate", str(tmp_path / "ckpt"),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("shardwise-to-fp32: error:")]


# -- temporaries of killed saves --------------------------------------------------------------------------------
def _dead_writer_name(final: str) -> str:
    """The temporary name a process that has exited would have used (a real, finished child process)."""
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('stale', sys.argv[1]); "
            "m = sys.modules['stale'] = u.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.temporary_name('X', 'dead'))")
    proc = subprocess.run([sys.executable, "-c", code, stale.__file__], capture_output=True, text=True, check=True,
                          timeout=60)  # stale.py needs only the standard library: a fast child
    return proc.stdout.strip()[: -len("X")] + final


def test_sweep_removes_only_temporaries_of_writers_that_are_gone(tmp_path) -> None:
    if stale.host_key() is None:
        pytest.skip("no /proc: no temporary can be proven abandoned here (sweep is then a no-op)")
    tag = tmp_path / "abandoned_tag"
    tag.mkdir()
    dead = tag / _dead_writer_name("rank00001-abcd.safetensors")
    dead.write_bytes(b"x" * 1000)
    live = tag / stale.temporary_name("rank00000-abcd.safetensors", "live")  # this process: a save in progress
    live.write_bytes(b"y" * 10)
    other_host = tag / f".tmp-{'f' * 12}p1s1-r-rank00002-abcd.safetensors"
    other_host.write_bytes(b"z")
    legacy = tag / ".tmp-0123abcd-rank00003-abcd.safetensors"  # older shardwise: writer unknown
    legacy.write_bytes(b"w")
    top = tmp_path / _dead_writer_name("latest")
    top.write_bytes(b"t")
    result = stale.sweep(str(tmp_path))
    assert sorted(result.removed) == sorted([str(dead), str(top)]) and result.removed_bytes == 1001
    assert live.exists() and other_host.exists() and legacy.exists() and result.kept == 3
    assert stale.sweep(str(tmp_path / "missing")).removed == []  # a save_dir that does not exist yet


def test_writer_tag_changes_in_a_forked_child() -> None:
    parent = stale.writer_tag()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its own tag, exit without running pytest's teardown
        os.write(write, stale.writer_tag().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    assert child != parent and f"p{pid}s" in child
