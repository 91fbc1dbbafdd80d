"""``import deepspeed`` as shardwise: a ``sys.meta_path`` finder mapping ``deepspeed[.X.Y]`` onto ``shardwise[.X.Y]``.

Unchanged scripts (Hugging Face Trainer and Accelerate, DeepSpeed examples) import ``deepspeed`` and its submodules
by DeepSpeed's paths. After :func:`install`, every such import returns the very module object shardwise already
uses (``deepspeed.runtime.zero.partition_parameters is shardwise.runtime.zero.partition_parameters``): there is
never a second copy of a module, so module state (process groups, the active ``zero.Init``, registries) is shared.

Nothing here runs by itself: the ``deepspeed`` shim the shardwise launcher puts on its ranks' ``PYTHONPATH``
(``launcher/deepspeed_shim.py``) and the ``compat/deepspeed`` distribution call :func:`install`. shardwise itself
never imports ``deepspeed``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence

__all__ = ["ALIAS", "DEEPSPEED_VERSION", "MARKER", "TARGET", "DeepSpeedAliasFinder", "compat_version",
           "describe_import_deepspeed", "install", "installed", "target_name", "uninstall"]

ALIAS = "deepspeed"
TARGET = "shardwise"
from shardwise.launcher.deepspeed_shim import DEEPSPEED_VERSION, compat_version  # noqa: E402 - one source


def target_name(fullname: str) -> str | None:
    """The shardwise module a ``deepspeed`` module name stands for (``None`` when it is not a deepspeed name)."""
    if fullname == ALIAS:
        return TARGET
    if fullname.startswith(ALIAS + "."):
        return TARGET + fullname[len(ALIAS):]
    return None


class _AliasLoader(importlib.abc.Loader):
    """Hands back the already-imported shardwise module instead of creating one."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system stamped the alias spec onto the module; give it back its own (its real name and file).
        if self._spec is not None:
            module.__spec__ = self._spec


class DeepSpeedAliasFinder(importlib.abc.MetaPathFinder):
    """Finds ``deepspeed`` and ``deepspeed.*`` as the matching ``shardwise`` modules."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        real = target_name(fullname)
        if real is None:
            return None
        try:
            module = importlib.import_module(real)
        except ModuleNotFoundError as exc:
            if exc.name != real:
                raise
            return None  # a name shardwise does not have: the usual ModuleNotFoundError, for the deepspeed name
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real), is_package=hasattr(module, "__path__"))


def _finder() -> DeepSpeedAliasFinder | None:
    return next((f for f in sys.meta_path if isinstance(f, DeepSpeedAliasFinder)), None)


def installed() -> bool:
    """Whether ``import deepspeed`` is currently routed to shardwise by this module."""
    return _finder() is not None


def install() -> None:
    """Route ``import deepspeed[.X]`` to ``shardwise[.X]`` (idempotent).

    Modules of shardwise already imported are registered under their deepspeed names at once, so that
    ``sys.modules['deepspeed.X']`` and ``sys.modules['shardwise.X']`` are the same object from the start."""
    if _finder() is None:
        sys.meta_path.insert(0, DeepSpeedAliasFinder())
    shardwise = importlib.import_module(TARGET)
    sys.modules[ALIAS] = shardwise
    for name, module in list(sys.modules.items()):
        if module is not None and (name == TARGET or name.startswith(TARGET + ".")):
            sys.modules.setdefault(ALIAS + name[len(TARGET):], module)


def uninstall() -> None:
    """Undo :func:`install` (for tests): remove the finder and the ``deepspeed`` names that point at shardwise."""
    finder = _finder()
    if finder is not None:
        sys.meta_path.remove(finder)
    for name, module in list(sys.modules.items()):
        if (name == ALIAS or name.startswith(ALIAS + ".")) and module is not None:
            if getattr(module, "__name__", "").split(".")[0] == TARGET:
                del sys.modules[name]


MARKER = "_alias.install()"  # what the launcher's shim and compat/deepspeed's __init__ run


def describe_import_deepspeed() -> str:
    """Which implementation ``import deepspeed`` gives in this environment, without importing it: shardwise
    (through this process's alias, the launcher's shim or the ``compat/deepspeed`` package), a real DeepSpeed,
    or nothing. Used by ``shardwise-report`` / ``ds_report``."""
    import importlib.metadata
    import importlib.util

    if installed():
        return "shardwise (aliased in this process)"
    versions = sorted({d.version for d in importlib.metadata.distributions() if d.metadata["Name"] == ALIAS})
    dist_text = f"distribution {', '.join(versions)}" if versions else "no deepspeed distribution metadata"
    try:
        spec = importlib.util.find_spec(ALIAS)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return (f"nothing ({dist_text}): run through the `shardwise`/`deepspeed` launcher, or "
                "`pip install ./compat/deepspeed` for torchrun / accelerate launch")
    try:
        with open(spec.origin) as f:
            ours = MARKER in f.read()
    except OSError:
        ours = False
    if ours:
        return f"shardwise ({dist_text}; {spec.origin})"
    return f"a real DeepSpeed, not shardwise ({dist_text}; {spec.origin})"
