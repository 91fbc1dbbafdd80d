"""Hardware profiles as data: peak FLOP/s, HBM bandwidth, device memory, intra/inter-node links.

A profile is a JSON file (``shardwise/plan/profiles/*.json``, or any path): the numbers come from vendor data
sheets and are listed with their sources in the file; the efficiencies and latencies are stated assumptions. The
step-time estimate (``step_time.py``) uses nothing else, so a different cluster is a different file.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
_GIB = 2**30


@dataclass(frozen=True)
class Link:
    """One kind of link, per accelerator and direction."""

    bytes_per_s: float
    efficiency: float  # achievable fraction of ``bytes_per_s`` for large collectives
    latency_s: float  # per collective / message

    @property
    def effective(self) -> float:
        """Bytes per second a large collective achieves."""
        return self.bytes_per_s * self.efficiency


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator model and its node and network."""

    name: str
    description: str
    device_memory: int  # bytes
    reserved: int  # bytes kept free for the runtime (context, communication buffers, fragmentation)
    peak_flops: dict[str, float]  # by dtype name: bf16 / fp16 / fp32
    matmul_efficiency: float
    hbm_bytes_per_s: float
    gpus_per_node: int
    intra_node: Link
    inter_node: Link
    host_bytes_per_s: float  # host memory bandwidth per accelerator (the CPU optimizer of ZeRO-Offload)
    pcie_bytes_per_s: float  # host <-> device, per accelerator and direction
    sources: list[str] = field(default_factory=list)

    @property
    def usable_memory(self) -> int:
        """Device bytes a training step may use."""
        return self.device_memory - self.reserved


class ProfileError(ValueError):
    """A hardware profile is unknown or malformed; the message lists the known ones or the missing key."""


def known_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str) -> HardwareProfile:
    """A shipped profile by name (``h100-sxm``, ``gaudi2``) or a JSON file of the same shape."""
    path = Path(name_or_path) if os.path.exists(name_or_path) else PROFILE_DIR / f"{name_or_path}.json"
    if not path.exists():
        close = difflib.get_close_matches(name_or_path, known_profiles(), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ProfileError(f"hardware profile {name_or_path!r} is neither a shipped profile "
                           f"({', '.join(known_profiles())}) nor a JSON file.{hint}")
    raw = json.loads(path.read_text())
    try:
        return HardwareProfile(
            name=raw["name"], description=raw.get("description", ""),
            device_memory=int(raw["device_memory_gib"] * _GIB), reserved=int(raw.get("reserved_gib", 0) * _GIB),
            peak_flops={k: float(v) for k, v in raw["peak_flops"].items()},
            matmul_efficiency=float(raw["matmul_efficiency"]), hbm_bytes_per_s=float(raw["hbm_bytes_per_s"]),
            gpus_per_node=int(raw["gpus_per_node"]), intra_node=Link(**raw["intra_node"]),
            inter_node=Link(**raw["inter_node"]), host_bytes_per_s=float(raw["host_bytes_per_s"]),
            pcie_bytes_per_s=float(raw["pcie_bytes_per_s"]), sources=list(raw.get("sources", [])))
    except (KeyError, TypeError) as exc:
        raise ProfileError(f"hardware profile {path}: missing or malformed field {exc}; see "
                           f"{PROFILE_DIR / 'h100-sxm.json'} for the expected shape") from None
