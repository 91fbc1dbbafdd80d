"""requirements/lock.txt: the committed pins are well formed and inside pyproject.toml's ranges, and the writer and
checker of ``tools/lockfile.py`` (what ``make lock`` and ``make check-lock`` run) behave as documented."""

from __future__ import annotations

from pathlib import Path

from tools.lockfile import check, normalise, pins_from_freeze, read, render

ROOT = Path(__file__).resolve().parents[2]


def test_committed_lock_pins_every_requirement_inside_its_range():
    assert check(ROOT / "requirements" / "lock.txt", ROOT / "pyproject.toml") == []
    pins, _ = read((ROOT / "requirements" / "lock.txt").read_text())
    assert pins["torch"] == "2.13.0"  # the CPU wheel this project's machines carry; CI tests exactly this


def test_freeze_output_becomes_sorted_normalised_pins():
    freeze = ["Jinja2==3.1.6", "torch==2.13.0+cpu", "huggingface_hub==2.4.0", "# Editable install (x==1)",
              "-e /src/shardwise", "pkg @ file:///tmp/pkg.whl", "zope.interface==7.0", ""]
    pins = pins_from_freeze(freeze)
    assert pins == {"jinja2": "3.1.6", "torch": "2.13.0", "huggingface-hub": "2.4.0", "zope-interface": "7.0"}
    text = render(pins)
    assert text.startswith("# ") and text.splitlines()[-4:] == [
        "huggingface-hub==2.4.0", "jinja2==3.1.6", "torch==2.13.0", "zope-interface==7.0"]
    assert read(text) == (pins, [])
    assert normalise("Foo__Bar.baz") == "foo-bar-baz"


def test_checker_names_each_problem(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch>=2.4", "numpy>=1.24"]\n'
                         '[project.optional-dependencies]\ndev = ["pytest>=8", "ruff>=0.6"]\n')
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\nnumpy==1.20.0\ntorch==2.13.0\npytest>=8\nPillow==1.0\naaa==1\naaa==2\n")
    problems = check(lock, pyproject)
    assert any("'pytest>=8' is not `name==version`" in p for p in problems)
    assert any("'Pillow==1.0' is not `name==version` (lowercase name" in p for p in problems)
    assert any("aaa is pinned twice" in p for p in problems)
    assert any("not sorted" in p for p in problems)
    assert any("numpy==1.20.0 is outside pyproject.toml's range 'numpy>=1.24'" in p for p in problems)
    assert any("ruff ('ruff>=0.6' in pyproject.toml) has no pin" in p for p in problems)
    assert not any(p.startswith("torch") for p in problems)
