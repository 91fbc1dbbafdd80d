"""Hostfiles, include/exclude filters and the world-info encoding: pure functions, no torch.

Owns the "which slots on which hosts" question for the launcher. A *resource pool* maps each host, in
hostfile order, to the list of slot (accelerator) ids it offers; every filter returns a new pool and
never mutates its input. The world info handed to each node's ``launch`` process is that pool, JSON
encoded and then URL-safe base64 encoded, exactly as DeepSpeed's ``--world_info`` argument is.

The semantics follow DeepSpeed's runner (``NODE_SPEC[@NODE_SPEC ...]`` with ``NODE_SPEC =
NAME[:SLOT[,SLOT ...]]``), with stricter validation: an included slot must exist in the hostfile,
``--num_nodes``/``--num_gpus`` may not exceed what the hostfile offers, and every error names the host,
slot or line at fault and what to do about it.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterable

__all__ = [
    "DEFAULT_HOSTFILE",
    "HostfileError",
    "decode_world_info",
    "encode_world_info",
    "fetch_hostfile",
    "filter_resources",
    "parse_hostfile",
    "parse_node_specs",
    "pool_from_slot_counts",
    "select_resources",
    "world_size",
]

DEFAULT_HOSTFILE = "/job/hostfile"

Pool = dict[str, list[int]]

_HOST_LINE = re.compile(r"^(?P<host>\S+)\s+slots\s*=\s*(?P<slots>\S+)\s*$")
_NODE_SEP = "@"
_SLOT_START = ":"
_SLOT_SEP = ","


class HostfileError(ValueError):
    """A hostfile, an include/exclude filter or a node/slot count that cannot be satisfied."""


def parse_hostfile(lines: Iterable[str] | str, source: str = "<hostfile>") -> dict[str, int]:
    """Parse MPI-style hostfile lines (``worker-0 slots=4``) into ``{host: slot_count}`` in file order.

    Blank lines and ``#`` comments (whole-line or trailing) are ignored. A line that is not
    ``HOST slots=N`` with N >= 1, a repeated host, or a file with no hosts raises :class:`HostfileError`
    naming ``source`` and the line number.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    pool: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        match = _HOST_LINE.match(line)
        if match is None:
            raise HostfileError(
                f"{where}: cannot parse {raw.strip()!r}; each line must be 'HOSTNAME slots=N' "
                "(for example 'worker-0 slots=8'), a '# comment' or blank"
            )
        host, slots_text = match.group("host"), match.group("slots")
        if not slots_text.isdigit() or int(slots_text) < 1:
            raise HostfileError(f"{where}: slots must be a positive integer, got {slots_text!r} for {host!r}")
        if host in pool:
            raise HostfileError(f"{where}: host {host!r} is listed twice; merge its lines into one")
        pool[host] = int(slots_text)
    if not pool:
        raise HostfileError(f"{source}: no hosts found; add lines like 'worker-0 slots=8' or remove the file")
    return pool


def fetch_hostfile(path: str) -> dict[str, int] | None:
    """Read and parse the hostfile at ``path``; ``None`` when nothing exists there (a local run).

    Something at ``path`` that is not a readable UTF-8 text file (a directory, no read permission, binary data)
    raises :class:`HostfileError` naming it: the user pointed at it, so running locally instead would be wrong.
    """
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path):
        raise HostfileError(f"hostfile {path} is a directory; pass the file itself (lines 'HOSTNAME slots=N')")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except UnicodeDecodeError as err:
        raise HostfileError(
            f"hostfile {path} is not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02x}); "
            "a hostfile has lines 'HOSTNAME slots=N'"
        ) from None
    except OSError as err:
        raise HostfileError(f"cannot read hostfile {path}: {err.strerror}") from None
    return parse_hostfile(lines, source=path)


def pool_from_slot_counts(counts: dict[str, int]) -> Pool:
    """Turn ``{host: n}`` into ``{host: [0, ..., n-1]}``."""
    return {host: list(range(n)) for host, n in counts.items()}


def parse_node_specs(spec: str, flag: str = "--include") -> dict[str, list[int]]:
    """Parse ``worker-0@worker-1:0,2`` into ``{"worker-0": [], "worker-1": [0, 2]}``.

    An empty slot list means "the whole host". A host named twice has its slot lists merged (as in
    DeepSpeed, ``w0@w0:1`` is just slot 1); slots come back sorted and de-duplicated. ``flag`` only
    names the option in error messages.
    """
    nodes: dict[str, list[int]] = {}
    for part in spec.split(_NODE_SEP):
        part = part.strip()
        if not part:
            raise HostfileError(f"{flag} {spec!r}: empty host between '@' separators")
        host, sep, slot_text = part.partition(_SLOT_START)
        if not host:
            raise HostfileError(f"{flag} {spec!r}: missing host name before ':' in {part!r}")
        slots: list[int] = []
        if sep:
            for item in slot_text.split(_SLOT_SEP):
                item = item.strip()
                if not item.isdigit():
                    raise HostfileError(
                        f"{flag} {spec!r}: slot {item!r} on host {host!r} is not a non-negative integer; "
                        "write slots as HOST:0,1,2"
                    )
                slots.append(int(item))
        nodes[host] = sorted(set(nodes.get(host, []) + slots))
    return nodes


def filter_resources(pool: Pool, include: str = "", exclude: str = "") -> Pool:
    """Apply an ``--include`` or ``--exclude`` filter to a resource pool (DeepSpeed's semantics).

    ``include`` keeps only the named hosts (all their slots, or the listed ones); ``exclude`` removes
    whole hosts or single slots. Hosts left with no slots disappear; hostfile order is kept. Naming a
    host or slot the pool does not have is an error, as is passing both filters.
    """
    if include and exclude:
        raise HostfileError("--include and --exclude are mutually exclusive; pass only one of them")
    if not include and not exclude:
        return {host: list(slots) for host, slots in pool.items()}
    flag, spec = ("--include", include) if include else ("--exclude", exclude)
    nodes = parse_node_specs(spec, flag)
    for host, slots in nodes.items():
        if host not in pool:
            known = ", ".join(pool) or "none"
            raise HostfileError(f"{flag}: host {host!r} is not in the hostfile (known hosts: {known})")
        missing = [s for s in slots if s not in pool[host]]
        if missing:
            raise HostfileError(f"{flag}: host {host!r} has no slot(s) {missing}; its slots are {pool[host]}")
    if include:
        kept = {host: (nodes[host] or list(pool[host])) for host in pool if host in nodes}
    else:
        kept = {}
        for host, slots in pool.items():
            if host in nodes:
                removed = nodes[host]
                slots = [s for s in slots if removed and s not in removed]
            kept[host] = list(slots)
    return {host: slots for host, slots in kept.items() if slots}


def select_resources(pool: Pool, include: str = "", exclude: str = "", num_nodes: int = -1, num_gpus: int = -1) -> Pool:
    """Filter ``pool`` by include/exclude, then keep the first ``num_nodes`` hosts and the first
    ``num_gpus`` slots of each (``-1`` means "all"). As in DeepSpeed, counts and filters don't mix."""
    if (num_nodes >= 0 or num_gpus >= 0) and (include or exclude):
        raise HostfileError(
            "--num_nodes/--num_gpus cannot be combined with --include/--exclude; "
            "express the selection with --include alone (e.g. -i 'worker-0:0,1@worker-1:0,1')"
        )
    active = filter_resources(pool, include, exclude)
    if not active:
        offered = ", ".join(f"{host}:{','.join(map(str, slots))}" for host, slots in pool.items())
        raise HostfileError(
            f"--exclude {exclude!r} leaves no slot to run on (on offer: {offered}); exclude fewer slots"
        )
    if num_nodes == 0 or num_gpus == 0:
        raise HostfileError("--num_nodes and --num_gpus must be at least 1 when given")
    if num_nodes > 0:
        if num_nodes > len(active):
            raise HostfileError(
                f"--num_nodes {num_nodes} but the hostfile offers only {len(active)} host(s): "
                f"{', '.join(active)}; lower --num_nodes or add hosts"
            )
        active = dict(list(active.items())[:num_nodes])
    if num_gpus > 0:
        short = {host: len(slots) for host, slots in active.items() if len(slots) < num_gpus}
        if short:
            detail = ", ".join(f"{host} has {n}" for host, n in short.items())
            raise HostfileError(
                f"--num_gpus {num_gpus} is more than the slots available ({detail}); "
                "lower --num_gpus or raise slots= in the hostfile"
            )
        active = {host: slots[:num_gpus] for host, slots in active.items()}
    return active


def world_size(pool: Pool) -> int:
    """Total number of ranks a pool starts."""
    return sum(len(slots) for slots in pool.values())


def encode_world_info(pool: Pool) -> str:
    """Encode a pool as DeepSpeed's ``--world_info`` string: URL-safe base64 of its JSON."""
    return base64.urlsafe_b64encode(json.dumps(pool).encode("utf-8")).decode("ascii")


def decode_world_info(text: str) -> Pool:
    """Decode a ``--world_info`` string back to ``{host: [slot, ...]}`` (order preserved)."""
    try:
        data = json.loads(base64.urlsafe_b64decode(text.encode("ascii")).decode("utf-8"))
    except (ValueError, UnicodeError) as err:
        raise HostfileError(
            f"--world_info is not base64-encoded JSON ({err}); it comes from the shardwise CLI"
        ) from err
    if not isinstance(data, dict) or not data:
        raise HostfileError("--world_info must encode a non-empty {host: [slot, ...]} mapping")
    pool: Pool = {}
    for host, slots in data.items():
        if not isinstance(slots, list) or not slots or not all(isinstance(s, int) for s in slots):
            raise HostfileError(f"--world_info: host {host!r} must map to a non-empty list of slot ids, got {slots!r}")
        pool[str(host)] = slots
    return pool
