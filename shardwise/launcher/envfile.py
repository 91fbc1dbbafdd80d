"""Which environment variables every rank gets: ``.deepspeed_env``/``.shardwise_env`` files and the
variables forwarded to remote nodes. Pure functions over dicts and files; no torch.

DeepSpeed users keep cluster settings (NCCL_*, proxies, PYTHONPATH, ...) in ``~/.deepspeed_env`` or
``./.deepspeed_env``; we read those and our own ``.shardwise_env`` so their files keep working.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = [
    "EXPORT_NAMES",
    "EXPORT_PREFIXES",
    "EnvFileError",
    "env_file_paths",
    "forwarded_environment",
    "load_env_files",
    "parse_env_file",
]

# Prefixes DeepSpeed forwards to remote nodes (MLFLOW, PYTHON, MV2, UCX, NCCL for CUDA, NEBULA), plus
# ours and the torch/gloo knobs that must agree across nodes.
EXPORT_PREFIXES: tuple[str, ...] = (
    "PYTHON",
    "MLFLOW",
    "UCX",
    "MV2",
    "NCCL",
    "NEBULA",
    "SHARDWISE_",
    "DS_",
    "GLOO_",
    "TORCH_NCCL_",
    "TORCH_DISTRIBUTED_",
)
EXPORT_NAMES: frozenset[str] = frozenset({"OMP_NUM_THREADS", "TORCH_CPP_LOG_LEVEL", "TORCH_SHOW_CPP_STACKTRACES"})


class EnvFileError(ValueError):
    """A line of an environment file is not ``NAME=VALUE``."""


def env_file_paths(home: str | None = None, cwd: str | None = None) -> list[str]:
    """The env files to read, lowest priority first: home then working directory, and in each the
    DeepSpeed file (name overridable with ``DS_ENV_FILE``) before ``.shardwise_env``
    (``SHARDWISE_ENV_FILE``). Later files override earlier ones."""
    home = os.path.expanduser("~") if home is None else home
    cwd = os.getcwd() if cwd is None else cwd
    names = [
        os.environ.get("DS_ENV_FILE", ".deepspeed_env"),
        os.environ.get("SHARDWISE_ENV_FILE", ".shardwise_env"),
    ]
    paths: list[str] = []
    for folder in (home, cwd):
        for name in names:
            path = os.path.abspath(os.path.join(folder, name))
            if path not in paths:
                paths.append(path)
    return paths


def parse_env_file(text: str, source: str = "<env file>") -> dict[str, str]:
    """Parse ``NAME=VALUE`` lines. Blank lines, ``#`` comments and a leading ``export`` are allowed;
    one pair of matching quotes around the value is removed; everything else is kept verbatim."""
    result: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name or not (name.replace("_", "a").isalnum() and not name[0].isdigit()):
            raise EnvFileError(
                f"{source}:{lineno}: expected NAME=VALUE with NAME made of letters, digits and '_', got {raw.strip()!r}"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        result[name] = value
    return result


def load_env_files(paths: list[str] | None = None) -> tuple[dict[str, str], list[str]]:
    """Read the env files that exist among ``paths`` (default :func:`env_file_paths`).

    Returns the merged variables and the list of files that were read."""
    merged: dict[str, str] = {}
    used: list[str] = []
    for path in env_file_paths() if paths is None else paths:
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
            except UnicodeDecodeError as err:
                raise EnvFileError(
                    f"{path} is not UTF-8 text (byte {err.start}); write it as NAME=VALUE lines"
                ) from None
            except OSError as err:
                raise EnvFileError(f"cannot read {path}: {err.strerror}") from None
            merged.update(parse_env_file(text, source=path))
            used.append(path)
    return merged, used


def forwarded_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` that multi-node runners export to every node (sorted by name)."""
    return {
        name: environ[name]
        for name in sorted(environ)
        if name in EXPORT_NAMES or any(name.startswith(prefix) for prefix in EXPORT_PREFIXES)
    }
