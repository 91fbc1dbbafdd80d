"""``Group``: a process group with its name and member ranks, so errors and the comms log can say which one.

Topology creates every ``Group``; the collective wrappers accept a ``Group``, a raw torch ``ProcessGroup`` (as
Megatron-style ``mpu`` objects hand out) or ``None`` (the world). A group of one rank carries no torch group at
all: every collective over it returns at once (the single-rank fast path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True, eq=False)
class Group:
    """One process group as seen from a member rank."""

    name: str
    ranks: tuple[int, ...]
    pg: Any = None  # torch ProcessGroup, or None for a single-rank group (and for the default world group)
    is_world: bool = False

    @property
    def size(self) -> int:
        """Number of member ranks."""
        return len(self.ranks)

    @property
    def rank(self) -> int:
        """This process's index inside the group (-1 if it is not a member)."""
        me = dist.get_rank() if dist.is_initialized() else 0
        return self.ranks.index(me) if me in self.ranks else -1

    def global_rank(self, group_rank: int) -> int:
        """Global rank of the member at ``group_rank``."""
        return self.ranks[group_rank]

    @property
    def torch_group(self) -> Any:
        """What to pass to torch.distributed (None means the default world group)."""
        return None if self.is_world else self.pg

    def __repr__(self) -> str:
        shown = self.ranks if self.size <= 8 else (*self.ranks[:4], "...", *self.ranks[-2:])
        return f"Group({self.name}, ranks={list(shown)})"


def world_group() -> Group:
    """The default group of every rank."""
    n = dist.get_world_size() if dist.is_initialized() else 1
    return Group("world", tuple(range(n)), pg=None, is_world=True)


def as_group(group: Any) -> Group:
    """Normalise ``None`` / a torch ProcessGroup / a ``Group`` into a ``Group``."""
    if isinstance(group, Group):
        return group
    if group is None or group is dist.GroupMember.WORLD:
        return world_group()
    ranks = tuple(dist.get_process_group_ranks(group))
    name = getattr(group, "group_desc", None) or "user"
    return Group(str(name), ranks, pg=group)
