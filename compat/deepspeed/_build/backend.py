"""Build backend of the compat package: setuptools', after refusing to replace a real DeepSpeed silently.

pip uninstalls an installed ``deepspeed`` distribution before installing this one. If that is a real DeepSpeed
(its version has no ``+shardwise``), the build stops with a message saying so, unless
``SHARDWISE_REPLACE_DEEPSPEED=1`` is set. The target environment is read by a child interpreter started with
``-I`` (pip's isolated build environment hides the target's site-packages from this process)."""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403 - the PEP 517 hooks not overridden here

_PROBE = ("import importlib.metadata as m\n"
          "try:\n d = m.distribution('deepspeed'); print(d.version, d.locate_file(''))\n"
          "except m.PackageNotFoundError:\n pass\n")


def _refuse_to_shadow() -> None:
    if os.environ.get("SHARDWISE_REPLACE_DEEPSPEED") == "1":
        return
    found = subprocess.run([sys.executable, "-I", "-c", _PROBE], capture_output=True, text=True).stdout.strip()
    if found and "shardwise" not in found.split()[0]:
        raise SystemExit(
            f"compat/deepspeed: a real DeepSpeed is installed here (deepspeed {found}). Installing this package "
            "would uninstall it and make `import deepspeed` give shardwise. Set SHARDWISE_REPLACE_DEEPSPEED=1 to do "
            "that on purpose, or use another virtual environment (or run through the `shardwise` launcher)."
        )


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _refuse_to_shadow()
    return _orig.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _refuse_to_shadow()
    return _orig.build_editable(wheel_directory, config_settings, metadata_directory)
