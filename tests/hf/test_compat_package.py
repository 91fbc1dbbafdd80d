"""``pip install ./compat/deepspeed`` into a throwaway virtual environment: ``import deepspeed`` is shardwise
(same module objects, version ``0.19.8+shardwise.0.1.0``), ``ds_report`` says so, and installing over a real
DeepSpeed stops with a message unless ``SHARDWISE_REPLACE_DEEPSPEED=1``."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _venv(tmp_path: Path) -> tuple[Path, Path]:
    """A bare venv that also sees this interpreter's site-packages (torch, pip, setuptools); its python and
    site-packages."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    parent = sysconfig.get_paths()["purelib"]
    (site / "parent.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    return python, site


def _pip_install(python: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           str(ROOT / "compat" / "deepspeed")], capture_output=True, text=True, env=env, timeout=300)


def test_compat_package_installs_shardwise_as_deepspeed_and_refuses_to_shadow(tmp_path: Path) -> None:
    python, site = _venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SHARDWISE_REPLACE_DEEPSPEED")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # a "real" DeepSpeed (its metadata) is installed: the build stops and says so
    real = site / "deepspeed-0.19.8.dist-info"
    real.mkdir()
    (real / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\nVersion: 0.19.8\n")
    (real / "RECORD").write_text("deepspeed-0.19.8.dist-info/METADATA,,\ndeepspeed-0.19.8.dist-info/RECORD,,\n")
    refused = _pip_install(python, env)
    assert refused.returncode != 0
    assert "a real DeepSpeed is installed here (deepspeed 0.19.8" in refused.stdout + refused.stderr
    assert "SHARDWISE_REPLACE_DEEPSPEED=1" in refused.stdout + refused.stderr
    # on purpose: pip uninstalls it (and says so), then import deepspeed is shardwise
    done = _pip_install(python, {**env, "SHARDWISE_REPLACE_DEEPSPEED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Successfully uninstalled deepspeed-0.19.8" in done.stdout
    check = subprocess.run([str(python), "-c", (
        "import importlib.metadata, deepspeed, shardwise\n"
        "import deepspeed.runtime.zero.partition_parameters as a, shardwise.runtime.zero.partition_parameters as b\n"
        "from transformers.integrations.deepspeed import is_deepspeed_available\n"
        "assert deepspeed is shardwise and a is b and is_deepspeed_available()\n"
        "print(importlib.metadata.version('deepspeed'))\n")], capture_output=True, text=True,
        env={**env, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "0.19.8+shardwise.0.1.0"
    report = subprocess.run([str(python.parent / "ds_report")], capture_output=True, text=True,
                            env={**env, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert report.returncode == 0, report.stderr
    line = next(x for x in report.stdout.splitlines() if x.startswith("import deepspeed gives"))
    assert "shardwise (distribution 0.19.8+shardwise.0.1.0" in line, line
