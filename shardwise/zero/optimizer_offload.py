"""NVMe optimizer offload for ZeRO-3: fp32 masters and Adam moments in files, stepped in sub-groups.

``offload_optimizer: {device: "nvme", nvme_path, ...}`` keeps, per optimizer group, three files (master, exp_avg,
exp_avg_sq: 12 bytes per element this rank owns). The step streams ``sub_group_size`` elements at a time: read the
three chunks, one fused CPU Adam pass that also writes the 16-bit weights (``adam_step_flat(lowp_out=...)``), write
master/moments back and the new weights into the parameter store. Only one sub-group of optimizer state is ever
resident. As in DeepSpeed, this path steps Adam/AdamW (the update must be elementwise and streamable).

Checkpoints and the inspection API read state through ``fragments()``: the first such call loads a group's state
into memory (``materialize``) and the next step or ``publish`` writes it back and drops it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from shardwise.ops.adam.cpu_adam import AdamBase, adam_step_flat
from shardwise.zero.flat_optimizer import FlatOptimizer
from shardwise.zero.param_offload import NvmeStore

_KINDS = ("master", "exp_avg", "exp_avg_sq")


def decoupled_weight_decay(basic: torch.optim.Optimizer) -> bool:
    """Whether the optimizer is AdamW-style; raises for anything that is not Adam/AdamW."""
    if isinstance(basic, AdamBase):
        return bool(basic.adam_w_mode)
    if isinstance(basic, torch.optim.AdamW):
        return True
    if isinstance(basic, torch.optim.Adam):
        return bool(basic.param_groups[0].get("decoupled_weight_decay", False))
    raise ValueError(
        f"zero_optimization.offload_optimizer.device 'nvme' streams Adam/AdamW state from disk; "
        f"{type(basic).__name__} is not supported there. Use optimizer type Adam or AdamW, or device 'cpu'"
    )


class SwappedAdam(FlatOptimizer):
    """``FlatOptimizer`` whose masters and Adam moments live in files."""

    def __init__(self, basic: torch.optim.Optimizer, groups: list, policy: Any, comm_group: Any, nvme_path: str,
                 sub_group_size: int, pool: Any) -> None:
        super().__init__(basic, groups, policy, comm_group)
        self.adamw = decoupled_weight_decay(basic)
        self.sub_group_size = max(1, int(sub_group_size))
        self.steps = [0] * len(groups)
        self.files: list[dict[str, NvmeStore] | None] = []
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        directory = os.path.join(nvme_path, f"shardwise-rank{rank}")
        for gi, g in enumerate(groups):
            if g is None:
                self.files.append(None)
                continue
            files = {k: NvmeStore(g.total, torch.float32, directory, f"optim{gi}-{k}", torch.device("cpu"), pool)
                     for k in _KINDS}
            # fp32 masters from the shards and zero moments, one sub-group at a time: never the whole group in memory
            zeros = torch.zeros(min(g.total, self.sub_group_size), dtype=torch.float32)
            for lo in range(0, g.total, zeros.numel()):
                n = min(zeros.numel(), g.total - lo)
                master = g.master[lo : lo + n] if g.master is not None else g.store.fetch(lo, n)
                files["master"].write(lo, master.to(torch.float32))
                for k in ("exp_avg", "exp_avg_sq"):
                    files[k].write(lo, zeros[:n])
            g.master = None  # not resident
            self.files.append(files)

    # -- resident view for checkpoints / inspection -------------------------------------------------------------
    def materialize(self, gi: int) -> dict[str, torch.Tensor]:
        """Load group ``gi``'s master and moments into memory (until the next step or publish)."""
        if gi not in self._cache:
            g, files = self.groups[gi], self.files[gi]
            self._cache[gi] = {k: files[k].fetch(0, g.total).clone() for k in _KINDS}
        return self._cache[gi]

    def _flush(self) -> None:
        for gi, values in self._cache.items():
            for k in _KINDS:
                self.files[gi][k].write(0, values[k])
        self._cache.clear()

    # -- step ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Stream every group through one fused Adam pass, ``sub_group_size`` elements at a time.

        The I/O overlaps the arithmetic: the next sub-group's three reads are issued before this one's Adam pass,
        and this one's writes (master, moments, new weights) run on the I/O pool during the next one's; at most two
        sub-groups are in memory (one being stepped, one being read or written).
        """
        self._flush()
        for gi, (g, files) in enumerate(zip(self.groups, self.files)):
            if g is None:
                continue
            hp = self.basic.param_groups[gi]
            self.steps[gi] += 1
            beta1, beta2 = hp["betas"]
            chunks = [(lo, min(self.sub_group_size, g.total - lo)) for lo in range(0, g.total, self.sub_group_size)]
            for k in _KINDS:
                files[k].prefetch(*chunks[0])
            writes: list = []
            for i, (lo, n) in enumerate(chunks):
                master, m, v = (files[k].fetch(lo, n) for k in _KINDS)
                if i + 1 < len(chunks):
                    for k in _KINDS:
                        files[k].prefetch(*chunks[i + 1])
                grad = g.part_grad[lo : lo + n].to(torch.float32)
                lowp = torch.empty(n, dtype=g.dtype)
                adam_step_flat(master, grad, m, v, step=self.steps[gi], lr=hp["lr"], beta1=beta1, beta2=beta2,
                               eps=hp["eps"], weight_decay=hp["weight_decay"], adamw_mode=self.adamw,
                               bias_correction=hp.get("bias_correction", True), lowp_out=lowp)
                for w in writes:  # the previous sub-group's writes: bounds the memory held by the pipeline
                    w.result()
                writes = [files[k].write_async(lo, t) for k, t in zip(_KINDS, (master, m, v))]
                if isinstance(g.store, NvmeStore):
                    writes.append(g.store.write_async(lo, lowp))
                else:
                    g.store.write(lo, lowp)
            for w in writes:
                w.result()
        self._refresh_persistent()

    @torch.no_grad()
    def publish(self) -> None:
        """Weights from the (possibly just loaded) masters into the parameter store."""
        self._flush()
        for g, files in zip(self.groups, self.files):
            if g is None:
                continue
            for lo in range(0, g.total, self.sub_group_size):
                n = min(self.sub_group_size, g.total - lo)
                g.store.write(lo, files["master"].fetch(lo, n).to(g.dtype))
        self._refresh_persistent()

    def _refresh_persistent(self) -> None:
        handles = []
        for g in self.live_groups:
            for u in g.units:
                u.comm.invalidate(u.cache)
                if u.state.value == "gathered":
                    handles.append(u.refresh())
        for h in handles:
            h.wait()

    def state_for(self, gi: int, offset: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Views (into the resident cache) of group ``gi``'s master and moments at ``[offset, offset + n)``."""
        values = self.materialize(gi)
        state = {k: values[k][offset : offset + n] for k in ("exp_avg", "exp_avg_sq")}
        return values["master"][offset : offset + n], state
