"""``deepspeed.git_version_info``: what this build is (shardwise has no compiled-op registry: ops build on use)."""

from __future__ import annotations

from shardwise import __version__
from shardwise.alias import compat_version

version = __version__
deepspeed_compatible_version = compat_version()
git_hash: str | None = None  # set for builds from a git checkout by packaging; None in an editable install
git_branch: str | None = None
installed_ops: dict[str, bool] = {}
compatible_ops: dict[str, bool] = {}
torch_info: dict[str, object] = {}

__all__ = ["compatible_ops", "deepspeed_compatible_version", "git_branch", "git_hash", "installed_ops",
           "torch_info", "version"]
