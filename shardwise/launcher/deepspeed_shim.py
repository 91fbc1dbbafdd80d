"""Make ``import deepspeed`` be shardwise inside the ranks the launcher starts, without touching the user's script.

The launcher writes a tiny site directory into its job's temporary folder and prepends it to the ranks'
``PYTHONPATH``. It holds a ``deepspeed`` package whose ``__init__`` installs :mod:`shardwise.alias` (so
``deepspeed.X is shardwise.X``) and ``deepspeed-<compat version>.dist-info/METADATA``, which is what Hugging Face
transformers and accelerate check (``importlib.metadata``) before they use DeepSpeed.

A real DeepSpeed is never shadowed silently. ``SHARDWISE_DEEPSPEED_ALIAS`` decides:

* ``auto`` (default): alias unless a real DeepSpeed is installed; then the ranks import the real DeepSpeed and the
  launcher says so, with how to choose shardwise instead;
* ``1``: alias even over an installed DeepSpeed (the launcher logs that it shadows it, and where it lives);
* ``0``: never alias.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import MutableMapping
from dataclasses import dataclass

__all__ = ["DEEPSPEED_VERSION", "ENV_VAR", "Decision", "compat_version", "decide", "installed_deepspeed", "prepare",
           "write_site"]

logger = logging.getLogger("shardwise.launcher")

ENV_VAR = "SHARDWISE_DEEPSPEED_ALIAS"
DEEPSPEED_VERSION = "0.19.8"  # the DeepSpeed release whose public surface shardwise mirrors


def compat_version() -> str:
    """The version the ``deepspeed`` name carries when it is shardwise: what it mirrors + what it is
    (``0.19.8+shardwise.0.1.0``), so version checks pass and ``pip list`` still tells it from DeepSpeed."""
    import importlib

    return f"{DEEPSPEED_VERSION}+shardwise.{importlib.import_module('shardwise').__version__}"

_INIT = '''"""deepspeed -> shardwise: written by the shardwise launcher for this job only (see shardwise/alias.py)."""
from shardwise import alias as _alias

_alias.install()  # replaces this module in sys.modules with shardwise
'''


@dataclass(frozen=True)
class InstalledDeepSpeed:
    """The ``deepspeed`` distribution importlib.metadata finds, and whether it is shardwise's compat package."""

    version: str
    location: str

    @property
    def is_shardwise(self) -> bool:
        return "shardwise" in self.version


@dataclass(frozen=True)
class Decision:
    """Whether the ranks get the alias, and the sentence the launcher logs about it (``None``: nothing to say)."""

    alias: bool
    message: str | None
    level: int = logging.INFO


def installed_deepspeed() -> InstalledDeepSpeed | None:
    """The installed ``deepspeed`` distribution in this interpreter's environment, if any."""
    try:
        dist = importlib.metadata.distribution("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return None
    return InstalledDeepSpeed(dist.version, str(dist.locate_file("")))


def decide(environ: MutableMapping[str, str], found: InstalledDeepSpeed | None) -> Decision:
    """What to do for ``SHARDWISE_DEEPSPEED_ALIAS`` and the ``deepspeed`` distribution found (pure)."""
    mode = environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{ENV_VAR}={environ[ENV_VAR]!r}: use auto (default), 1 (alias even over an installed "
                         "DeepSpeed) or 0 (never alias)")
    if mode == "0":
        return Decision(False, f"{ENV_VAR}=0: the ranks' `import deepspeed` is left alone")
    if found is not None and found.is_shardwise:
        return Decision(False, f"deepspeed {found.version} (shardwise's compat package) is installed: "
                               "`import deepspeed` already gives shardwise")
    if found is not None and mode == "auto":
        return Decision(False, f"a real DeepSpeed {found.version} is installed ({found.location}): the ranks' "
                               f"`import deepspeed` gives DeepSpeed, not shardwise. Set {ENV_VAR}=1 to run them "
                               "on shardwise instead, or 0 to silence this", logging.WARNING)
    if found is not None:
        return Decision(True, f"{ENV_VAR}=1: the ranks' `import deepspeed` gives shardwise, shadowing the "
                              f"installed DeepSpeed {found.version} ({found.location})", logging.WARNING)
    return Decision(True, None)


def write_site(directory: str) -> str:
    """Write the ``deepspeed`` shim package and its dist-info under ``directory``; returns ``directory``."""
    version = compat_version()
    package = os.path.join(directory, "deepspeed")
    os.makedirs(package, exist_ok=True)
    with open(os.path.join(package, "__init__.py"), "w") as f:
        f.write(_INIT)
    info = os.path.join(directory, f"deepspeed-{version}.dist-info")
    os.makedirs(info, exist_ok=True)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: deepspeed\nVersion: {version}\n"
                "Summary: shardwise under DeepSpeed's name (written by the shardwise launcher)\n")
    with open(os.path.join(info, "INSTALLER"), "w") as f:
        f.write("shardwise-launcher\n")
    return directory


def prepare(work_dir: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Decide, log, and when aliasing write the site under ``work_dir`` and prepend it to ``PYTHONPATH`` in
    ``environ`` (default ``os.environ``, which the ranks inherit). Returns whether the ranks get the alias."""
    environ = os.environ if environ is None else environ
    decision = decide(environ, installed_deepspeed())
    if decision.message:
        logger.log(decision.level, decision.message)
    if not decision.alias:
        return False
    site = write_site(os.path.join(work_dir, "deepspeed-alias"))
    previous = environ.get("PYTHONPATH")
    environ["PYTHONPATH"] = site + (os.pathsep + previous if previous else "")
    return True
