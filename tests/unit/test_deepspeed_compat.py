"""``import deepspeed`` as shardwise: the alias (one module object per name), the launcher's shim site, the
``init_distributed`` world-size guard, and the DeepSpeed facades Hugging Face Trainer / Accelerate import."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from shardwise.comm.init import check_world_matches, launcher_world_size
from shardwise.launcher import deepspeed_shim
from shardwise.launcher.deepspeed_shim import Decision, InstalledDeepSpeed, decide
from tests.dist import run_ranks

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_alias_gives_the_same_module_objects_and_is_idempotent() -> None:
    out = _python("""
        import sys
        import shardwise.alias as alias
        alias.install(); alias.install()
        import deepspeed, shardwise
        import deepspeed.runtime.zero.partition_parameters as a
        import shardwise.runtime.zero.partition_parameters as b
        from deepspeed import comm as dist
        from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES, WARMUP_MIN_LR
        from deepspeed.launcher.runner import DEEPSPEED_ENVIRONMENT_NAME
        assert deepspeed is shardwise and a is b and dist is shardwise.comm, (deepspeed, a, b)
        assert a.__spec__.name == "shardwise.runtime.zero.partition_parameters", a.__spec__
        assert sum(type(f).__name__ == "DeepSpeedAliasFinder" for f in sys.meta_path) == 1
        dups = [n for n, m in sys.modules.items() if n.startswith("deepspeed") and
                sys.modules.get("shardwise" + n[len("deepspeed"):]) is not m]
        assert not dups, dups
        try:
            import deepspeed.no_such_module
        except ModuleNotFoundError as e:
            assert "deepspeed.no_such_module" in str(e), e
        else:
            raise AssertionError("imported a module that does not exist")
        print("OK", WARMUP_MIN_LR, DEEPSPEED_ENVIRONMENT_NAME)
    """)
    assert out.returncode == 0, out.stderr
    assert "OK warmup_min_lr .deepspeed_env" in out.stdout


def test_shim_site_makes_import_deepspeed_shardwise_and_passes_version_checks(tmp_path: Path) -> None:
    site = deepspeed_shim.write_site(str(tmp_path / "site"))
    out = _python("""
        import importlib.metadata, deepspeed, shardwise
        from transformers.integrations.deepspeed import is_deepspeed_available
        from transformers.utils.versions import require_version
        require_version("deepspeed>=0.9.3")
        assert deepspeed is shardwise and is_deepspeed_available()
        print(importlib.metadata.version("deepspeed"))
    """, env={"PYTHONPATH": f"{site}{os.pathsep}{ROOT}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.19.8+shardwise.0.1.0"


def test_shim_never_shadows_a_real_deepspeed_silently(tmp_path: Path) -> None:
    real = InstalledDeepSpeed("0.19.8", "/site-packages")
    auto = decide({}, real)
    assert not auto.alias and auto.level == logging.WARNING
    assert "real DeepSpeed 0.19.8" in auto.message and "SHARDWISE_DEEPSPEED_ALIAS=1" in auto.message
    forced = decide({"SHARDWISE_DEEPSPEED_ALIAS": "1"}, real)
    assert forced.alias and "shadowing" in forced.message
    assert not decide({"SHARDWISE_DEEPSPEED_ALIAS": "0"}, None).alias
    assert decide({}, None) == Decision(True, None)
    assert not decide({}, InstalledDeepSpeed("0.19.8+shardwise.0.1.0", "/x")).alias  # the compat package
    with pytest.raises(ValueError, match="SHARDWISE_DEEPSPEED_ALIAS='maybe'"):
        decide({"SHARDWISE_DEEPSPEED_ALIAS": "maybe"}, None)
    env = {"PYTHONPATH": "/user/path"}
    assert deepspeed_shim.prepare(str(tmp_path), env) == (deepspeed_shim.installed_deepspeed() is None)
    if deepspeed_shim.installed_deepspeed() is None:
        assert env["PYTHONPATH"] == f"{tmp_path}/deepspeed-alias{os.pathsep}/user/path"
        assert (tmp_path / "deepspeed-alias" / "deepspeed" / "__init__.py").is_file()


def test_world_guard_names_both_numbers() -> None:
    check_world_matches(1, {})
    check_world_matches(2, {"WORLD_SIZE": "2", "RANK": "0"})
    check_world_matches(1, {"WORLD_SIZE": "1", "RANK": "0"})
    check_world_matches(1, {"SLURM_NTASKS": "4"})  # an allocation without this process being a task: not a job
    with pytest.raises(RuntimeError, match=r"started 2 ranks \(WORLD_SIZE=2\).*default group has 1 rank"):
        check_world_matches(1, {"WORLD_SIZE": "2", "RANK": "1"})
    with pytest.raises(RuntimeError, match=r"OMPI_COMM_WORLD_SIZE=4"):
        check_world_matches(1, {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"})
    assert launcher_world_size({"SLURM_NTASKS": "8", "SLURM_PROCID": "3"}) == (8, "SLURM_NTASKS")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_distributed_without_mpi_discovery_still_joins_the_torchrun_world() -> None:
    code = """
        import os, torch.distributed as dist
        import shardwise
        shardwise.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        print("WORLD", dist.get_world_size(), dist.get_rank())
    """
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "SHARDWISE_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert sorted(out.split()[-1] for out, _ in outs) == ["0", "1"]
    assert all("WORLD 2" in out for out, _ in outs)


def test_init_distributed_refuses_a_one_rank_group_in_a_two_rank_job() -> None:
    out = _python(f"""
        import torch.distributed as dist, shardwise
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        shardwise.init_distributed(auto_mpi_discovery=False)
    """, env={"WORLD_SIZE": "2", "RANK": "1", "SHARDWISE_ACCELERATOR": "cpu"})
    assert out.returncode != 0
    assert "started 2 ranks (WORLD_SIZE=2)" in out.stderr and "default group has 1 rank" in out.stderr


def test_config_accepts_infinity_and_reads_like_a_dict() -> None:
    from shardwise.config import load_config

    cfg = load_config(json.loads('{"train_batch_size": 4, "steps_per_print": Infinity, '
                                 '"zero_optimization": {"stage": 2}}'))
    assert cfg.steps_per_print is None
    assert load_config({"train_batch_size": 4, "steps_per_print": math.inf}).steps_per_print is None
    assert cfg.get("zero_optimization", {}).get("stage") == 2 and cfg["train_batch_size"] == 4
    assert "zero_optimization" in cfg and cfg.get("nope", 7) == 7


def test_facades_are_our_own_objects() -> None:
    import shardwise
    from shardwise.engine import lr_schedules as ours
    from shardwise.runtime import lr_schedules
    from shardwise.runtime.zero import partition_parameters as pp
    from shardwise.runtime.zero.config import DeepSpeedZeroConfig
    from shardwise.utils import groups, set_z3_leaf_modules
    from shardwise.utils.zero_to_fp32 import get_optim_files

    assert lr_schedules.WarmupLR is ours.WarmupLR and lr_schedules.VALID_LR_SCHEDULES is ours.VALID_LR_SCHEDULES
    assert lr_schedules.WARMUP_MIN_LR == "warmup_min_lr" and lr_schedules.WARMUP_NUM_STEPS == "warmup_num_steps"
    assert pp.Init is shardwise.zero.Init and pp.ZeroParamStatus.AVAILABLE == "AVAILABLE"
    assert DeepSpeedZeroConfig is shardwise.config.ZeroConfig
    assert shardwise.runtime.engine.DeepSpeedEngine is shardwise.Engine
    assert shardwise.runtime.utils.see_memory_usage is shardwise.utils.memory.see_memory_usage
    moved = shardwise.runtime.utils.move_to_device({"a": [torch.ones(1)], "b": 3}, "cpu")
    assert moved["b"] == 3 and torch.equal(moved["a"][0], torch.ones(1))
    assert shardwise.accelerator.is_current_accelerator_supported()
    assert shardwise.git_version_info.version == shardwise.__version__ and shardwise.__git_hash__ is None
    assert groups._get_sequence_parallel_world_size() == 1
    from shardwise.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    assert UlyssesSPAttentionHF is shardwise.sp.hf_ulysses.UlyssesSPAttentionHF
    assert not hasattr(shardwise, "moe") or shardwise.moe  # no dangling lazy name
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert set_z3_leaf_modules(model, [torch.nn.Linear]) == [model[0]] and model[0]._z3_leaf
    with pytest.raises(ValueError, match="no submodule of Sequential is one of"):
        set_z3_leaf_modules(model, ["Conv2d"])
    with pytest.raises(FileNotFoundError, match="no shardwise rank files"):
        get_optim_files("/nonexistent")
    from shardwise.ops.adagrad import DeepSpeedCPUAdagrad
    p = torch.nn.Parameter(torch.ones(3))
    opt, ref = DeepSpeedCPUAdagrad([p], lr=0.1), torch.optim.Adagrad([q := torch.nn.Parameter(torch.ones(3))], lr=0.1)
    p.grad, q.grad = torch.full((3,), 0.5), torch.full((3,), 0.5)
    opt.step(), ref.step()
    assert torch.equal(p, q)
    wrapped = pp.zero_wrapper_for_fp_tensor_constructor(torch.ones, torch.bfloat16)
    assert wrapped(2).dtype == torch.bfloat16 and wrapped(2, dtype=torch.long).dtype == torch.long


def _init_attrs() -> dict:
    import shardwise

    cfg = {"train_batch_size": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    with shardwise.zero.Init(config_dict_or_path=cfg):
        layer = torch.nn.Linear(5, 3)
    w = layer.weight
    from shardwise.runtime.zero.partition_parameters import ZeroParamStatus
    before = (w.ds_status == ZeroParamStatus.NOT_AVAILABLE)
    with shardwise.zero.GatheredParameters([w]):
        during = w.ds_status == "AVAILABLE" and tuple(w.shape) == (3, 5)
    return {"numel": w.ds_numel, "shape": tuple(w.ds_shape), "dtype": str(w.ds_tensor.dtype),
            "local": w.ds_tensor.numel(), "ids": (w.ds_id, layer.bias.ds_id), "before": before, "during": during,
            "data": w.numel()}


def test_zero_init_params_carry_ds_attributes_and_follow_the_config() -> None:
    r0, r1 = run_ranks(_init_attrs, world_size=2)
    for r in (r0, r1):
        assert r["numel"] == 15 and r["shape"] == (3, 5) and r["dtype"] == "torch.bfloat16" and r["data"] == 0
        assert r["before"] and r["during"] and r["ids"][0] != r["ids"][1]
    assert r0["local"] + r1["local"] == 15


def test_schedules_refuse_zero_step_sizes() -> None:
    from shardwise.runtime.lr_schedules import LRRangeTest, OneCycle

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"lr_range_test_step_size=0 must be a positive"):
        LRRangeTest(opt, lr_range_test_step_size=0)
    with pytest.raises(ValueError, match=r"cycle_first_step_size=0 must be a positive"):
        OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=0)
    with pytest.raises(ValueError, match=r"cycle_second_step_size=0 must be a positive"):
        OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=4, cycle_second_step_size=0)


def test_cpu_device_count_is_the_local_rank_count(monkeypatch) -> None:
    from shardwise.accelerator.cpu import CpuAccelerator

    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert CpuAccelerator().device_count() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert CpuAccelerator().device_count() == 2
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert CpuAccelerator().device_count() == 4


def test_ds_to_universal_copies_a_committed_checkpoint(tmp_path: Path) -> None:
    from shardwise.checkpoint.ds_to_universal import main

    tag = tmp_path / "ckpt" / "global_step2"
    tag.mkdir(parents=True)
    (tag / "manifest.json").write_text("{}")
    (tag / "rank00000-ab.safetensors").write_bytes(b"x")
    out = tmp_path / "ckpt" / "global_step2_universal"
    assert main(["--input_folder", str(tag), "--output_folder", str(out), "--num_extract_workers", "4"]) == 0
    assert (out / "rank00000-ab.safetensors").read_bytes() == b"x"
    assert (tmp_path / "ckpt" / "latest_universal").read_text() == "global_step2_universal"
    assert main(["--input_folder", str(tag), "--output_folder", str(out)]) == 2  # exists
    assert main(["--input_folder", str(tmp_path), "--output_folder", str(tmp_path / "o")]) == 2  # no manifest
