"""``shardwise-report``: what this environment can run, as ``ds_report`` prints for DeepSpeed.

Versions (python, torch, shardwise, pydantic, safetensors, transformers), the accelerator that would be chosen and
why, device counts, which torch.distributed backends are compiled in, bf16/fp16 support, whether graph capture is
available, the state of shardwise's native pieces (the C CPU Adam kernel), and which implementation ``import deepspeed``
gives here (shardwise through its alias or compat package, a real DeepSpeed, or none).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
from typing import Any


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception as exc:  # a broken optional package must not break the report
        return f"import failed ({type(exc).__name__}: {exc})"


def collect() -> dict[str, Any]:
    """Everything the report shows, as a dict (also used by tests)."""
    import torch
    import torch.distributed as dist

    import shardwise
    from shardwise.accelerator import AcceleratorError, get_accelerator

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "shardwise": shardwise.__version__,
        "torch": torch.__version__,
        "torch cuda build": torch.version.cuda or "none",
        "pydantic": _version("pydantic"),
        "safetensors": _version("safetensors"),
        "transformers": _version("transformers"),
        "SHARDWISE_ACCELERATOR": os.environ.get("SHARDWISE_ACCELERATOR", "(unset)"),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "(unset)"),
    }
    try:
        acc = get_accelerator()
        info.update({
            "accelerator": acc.device_name(),
            "communication backend": acc.communication_backend_name(),
            "device count": acc.device_count(),
            "bf16 supported": acc.is_bf16_supported(),
            "fp16 supported": acc.is_fp16_supported(),
            "graph capture": acc.supports_graph_capture(),
        })
    except AcceleratorError as exc:
        info["accelerator"] = f"error: {exc}"
    info["distributed available"] = dist.is_available()
    for backend in ("gloo", "nccl", "mpi", "ucc"):
        checker = getattr(dist, f"is_{backend}_available", None)
        info[f"backend {backend}"] = bool(checker()) if checker else False
    from shardwise.alias import describe_import_deepspeed

    info["import deepspeed gives"] = describe_import_deepspeed()
    info["habana_frameworks"] = "installed" if importlib.util.find_spec("habana_frameworks") else "not installed"
    try:
        from shardwise.ops.adam.cpu_adam import backend_name

        info["CPU Adam kernel"] = backend_name()
    except Exception as exc:
        info["CPU Adam kernel"] = f"unavailable ({exc})"
    return info


def main(argv: list[str] | None = None, prog: str = "shardwise-report") -> int:
    """Print the environment report; ``--json`` for machine-readable output."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=2, default=str))
        return 0
    width = max(len(k) for k in info)
    print("shardwise environment report")
    print("-" * (width + 40))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def main_ds_report(argv: list[str] | None = None) -> int:
    """The ``ds_report`` command of the ``compat/deepspeed`` package: the same report under DeepSpeed's name."""
    return main(argv, prog="ds_report")


if __name__ == "__main__":
    sys.exit(main())
