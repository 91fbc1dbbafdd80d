"""``pip install ./compat/deepspeed`` into a throwaway virtual environment: ``import deepspeed`` is shardwise
(same module objects, version ``0.19.8+shardwise.0.1.0``), ``ds_report`` says so, and installing over a real
DeepSpeed stops with a message unless ``SHARDWISE_REPLACE_DEEPSPEED=1``."""

from __future__ import annotations

import json
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
    # the launchers shardwise does not start: torchrun (Trainer, ZeRO-3) and `accelerate launch --use_deepspeed`
    # (custom loop, ZeRO-2). Loss equality with one process is tested through the shardwise launcher
    # (test_trainer.py, test_accelerate.py); here, that these routes reach shardwise as one 2-rank job.
    from tests.hf.conftest import ds_config, hf_env, save_tiny_llama

    model = save_tiny_llama(str(tmp_path / "model"))
    run_env = {**hf_env(), "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cfg = tmp_path / "z3.json"
    cfg.write_text(json.dumps(ds_config(3)))
    torchrun = _run([str(python), "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     str(ROOT / "tests/hf/scripts/trainer_run.py"), "--model", model, "--batch", "2", "--deepspeed",
                     str(cfg), "--out", str(tmp_path / "torchrun")], run_env, tmp_path / "torchrun")
    assert torchrun["world"] == 2 and torchrun["zero_init"] and len(torchrun["losses"]) == 4
    assert abs(torchrun["losses"][0] - FIRST_TRAINER_LOSS) < 1e-5, torchrun["losses"]
    acc_cfg = tmp_path / "acc.json"
    acc_cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
                                   "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}))
    (tmp_path / "acc").mkdir()
    launched = _run([str(python), "-m", "accelerate.commands.launch", "--use_deepspeed", "--num_processes", "2",
                     "--deepspeed_config_file", str(acc_cfg), str(ROOT / "tests/hf/scripts/accelerate_loop.py"),
                     "--model", model, "--batch", "2", "--out", str(tmp_path / "acc")], run_env, tmp_path / "acc")
    assert launched["world"] == 2 and launched["losses"][2:4] == launched["losses"][4:6]
    assert launched["engine"] == "shardwise.engine.engine.Engine", launched["engine"]
    assert abs(launched["losses"][0] - FIRST_LOOP_LOSS) < 1e-5, launched["losses"]


# First losses (before any update) of the tiny Llama on the scripts' data, as one process computes them: a job split
# into one-rank worlds would see other batches.
FIRST_TRAINER_LOSS = 4.168299674987793
FIRST_LOOP_LOSS = 4.15767765045166


def _run(cmd: list[str], env: dict[str, str], out: Path) -> dict:
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "result.json").read_text())
