"""The layout rules of ARCHITECTURE.md, enforced: size budgets, one owner for device APIs, pure modules."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "shardwise"
SOURCES = sorted(PACKAGE.rglob("*.py"))
#: modules that must stay free of torch.distributed (pure math and planning)
PURE = ["comm/grid.py", "comm/env.py", "zero/layout.py", "pipe/schedule.py", "pipe/partition.py",
        "launcher/hostfile.py", "tp/partition.py", "sp/hf_masks.py"]


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(PACKAGE))


@pytest.mark.parametrize("path", SOURCES, ids=_rel)
def test_module_size_budget(path: pathlib.Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 700, f"{_rel(path)} has {lines} lines; split it by responsibility (budget ~600)"


def test_only_the_accelerator_package_names_device_apis() -> None:
    offenders = []
    for path in SOURCES:
        if _rel(path).startswith("accelerator/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("cuda", "hpu") and \
                    isinstance(node.value, ast.Name) and node.value.id == "torch":
                offenders.append(f"{_rel(path)}:{node.lineno}")
    assert not offenders, f"torch.cuda / torch.hpu used outside shardwise/accelerator/: {offenders}"


@pytest.mark.parametrize("rel", PURE)
def test_pure_modules_do_not_import_torch_distributed(rel: str) -> None:
    tree = ast.parse((PACKAGE / rel).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module] + \
               [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("torch.distributed")], f"{rel} imports {imported}"


def test_config_imports_nothing_else_of_shardwise() -> None:
    for path in (PACKAGE / "config").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shardwise"):
                assert node.module.startswith("shardwise.config"), f"{_rel(path)} imports {node.module}"


def test_public_names_resolve_as_deepspeed_users_type_them() -> None:
    import shardwise as deepspeed

    for name in ("initialize", "init_distributed", "init_inference", "add_config_arguments", "get_accelerator",
                 "PipelineModule", "LayerSpec", "TiedLayerSpec"):
        assert callable(getattr(deepspeed, name)), name
    assert deepspeed.zero.Init and deepspeed.zero.GatheredParameters and deepspeed.zero.register_external_parameter
    assert deepspeed.checkpointing.checkpoint and deepspeed.checkpointing.configure
    assert deepspeed.runtime.activation_checkpointing.checkpointing.checkpoint is deepspeed.checkpointing.checkpoint
    assert deepspeed.utils.safe_get_full_grad and deepspeed.utils.RepeatingLoader
    assert deepspeed.ops.adam.DeepSpeedCPUAdam and deepspeed.comm.all_reduce and deepspeed.comm.log_summary
    from shardwise.accelerator import get_accelerator
    from shardwise.sequence.layer import DistributedAttention

    assert get_accelerator is deepspeed.get_accelerator and DistributedAttention
