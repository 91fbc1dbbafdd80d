"""The monitors' optional packages: which one each backend needs, and the error when it is missing.

``check_backends(config)`` runs in ``initialize`` on every rank before any work (only rank 0 writes events, but
every rank must fail the same way rather than leave rank 0 alone with the error and the others waiting on it).
It only looks for the packages (``importlib.util.find_spec``), so it costs no import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardwise.config.errors import ConfigError

if TYPE_CHECKING:
    from shardwise.config import ShardwiseConfig


KIND_MISSING_PACKAGE = "missing_package"


@dataclass(frozen=True)
class Requirement:
    """A monitor backend's package: the config block that enables it, the module, the pip spec and our extra (None
    where shardwise has no extra for it: trackio's releases need an older pillow than the project pins)."""

    block: str
    module: str
    pip: str
    extra: str | None
    min_version: tuple[int, ...] = ()


REQUIREMENTS = {
    "tensorboard": Requirement("tensorboard", "tensorboard", "tensorboard", "tensorboard"),
    "wandb": Requirement("wandb", "wandb", "wandb", "wandb"),
    "comet": Requirement("comet", "comet_ml", "comet_ml>=3.41.0", "comet", (3, 41, 0)),
    "trackio": Requirement("trackio", "trackio", "trackio>=0.2", None, (0, 2)),
}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def problem(req: Requirement) -> str | None:
    """Why ``req`` cannot be used here (missing or too old), or None when it can."""
    if importlib.util.find_spec(req.module) is None:
        why = f'needs the "{req.module}" package, which is not installed'
    elif req.min_version:
        try:
            found = importlib.metadata.version(req.module)
        except importlib.metadata.PackageNotFoundError:
            return None  # importable but without metadata (a source checkout): trust it
        if _version_tuple(found) >= req.min_version:
            return None
        why = f'needs {req.pip}, but {req.module} {found} is installed'
    else:
        return None
    install = (f'pip install "shardwise[{req.extra}]" (or pip install "{req.pip}")' if req.extra
               else f'pip install "{req.pip}"')
    return f'{req.block}.enabled = true {why}. Fix: {install}, or set "{req.block}": {{"enabled": false}}.'


def require(name: str) -> None:
    """Raise the ConfigError for backend ``name`` if its package is unusable."""
    req = REQUIREMENTS[name]
    text = problem(req)
    if text is not None:
        raise ConfigError(text, path=f"{req.block}.enabled", kind=KIND_MISSING_PACKAGE)


def check_backends(config: ShardwiseConfig) -> None:
    """Raise one ConfigError listing every enabled monitor whose package is missing or too old."""
    from shardwise.config.errors import Problem

    problems = []
    for name, req in REQUIREMENTS.items():
        section = getattr(config, name, None)
        if section is not None and section.enabled:
            text = problem(req)
            if text is not None:
                problems.append(Problem(f"{req.block}.enabled", text, KIND_MISSING_PACKAGE))
    if problems:
        raise ConfigError.from_problems(problems)
