"""A step-time estimate for one rank from a hardware profile, the model's FLOPs and the measured traffic.

[Note: step-time model] Stated, simple, and meant for plausibility, not prediction:

* compute: matmul FLOPs of this rank's part (``6 x matmul parameters x tokens`` plus attention
  ``12 x layers x h x s x tokens / t``; one more forward, ``2 N + 4 L h s``, when activation checkpointing
  recomputes) at ``peak_flops x matmul_efficiency``;
* elementwise work (norms, rotary, SwiGLU, softmax statistics, casts) is memory-bound: each byte of the
  activations a micro-batch saves is taken to cross HBM four times (written and read in forward, read and its
  gradient written in backward; six with recomputation), at ``hbm_bytes_per_s``;
* pipeline: the compute of a step stretches to ``compute / (1 - bubble)`` (the replayed bubble of ``pipeline.py``);
* communication: every (op, group) of the measured step costs ``wire bytes / (intra-node bandwidth x
  efficiency) + count x latency`` when the group sits on one node; when it spans nodes, the larger of that and
  ``inter-node bytes / (network bandwidth x efficiency)`` (the NVLink and network hops of a ring pipeline; the
  inter-node bytes are each port's share, [Note: inter-node bytes] in probe.py), plus the network's latency;
* overlap: ZeRO traffic issued during forward and backward (ZeRO-3 prefetched gathers, gradient reductions
  launched from backward hooks) hides behind that compute, up to its length; tensor/sequence-parallel
  collectives (on the critical path of every layer), pipeline sends (charged in full, conservatively), the
  pipeline's data-parallel reduction and everything in the optimizer step are exposed;
* optimizer: the step reads and writes the owned fp32 master and Adam state (and reads gradients, writes
  weights) at HBM bandwidth; with ZeRO-Offload on the host, at the host's memory bandwidth per accelerator, plus
  the gradients down and the weights up over PCIe (exposed); offloaded parameter shards cross PCIe at every
  gather (forward and backward), overlappable like the gathers.

Model FLOPs (the MFU numerator) follow PaLM / torchtitan: ``6 N + 12 L h s`` per token, ``N`` the parameters
without the embedding table; recomputation is not model work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from shardwise.plan.hardware import HardwareProfile
from shardwise.plan.models import llama_parameters

_EXPOSED_GROUPS = ("tp", "sp", "pp", "pp+tp")
_OVERLAP_PHASES = ("forward", "backward")


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step on one rank, by part, and what they imply."""

    compute_s: float  # matmuls + memory-bound elementwise work
    elementwise_s: float  # the memory-bound part of compute_s
    bubble_s: float
    exposed_comm_s: float
    hidden_comm_s: float  # overlappable traffic hidden behind compute
    optimizer_s: float
    step_s: float
    model_flops_per_token: float
    tokens_per_step: int  # over the whole job
    tokens_per_s_per_device: float
    mfu: float
    comm_by_group: dict[str, float] = field(default_factory=dict)  # seconds, exposed or not

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def model_flops_per_token(params: int, vocab: int, dim: int, n_layers: int, seq_len: int) -> float:
    """``6 N + 12 L h s`` (N without the embedding table)."""
    return 6.0 * (params - vocab * dim) + 12.0 * n_layers * dim * seq_len


def _comm(rows: list[Any], hw: HardwareProfile) -> tuple[float, float, dict[str, float]]:
    """(exposed seconds, overlappable seconds, seconds by group)."""
    exposed = overlappable = 0.0
    by_group: dict[str, float] = {}
    for r in rows:
        seconds = r.wire_bytes / hw.intra_node.effective + r.count * hw.intra_node.latency_s
        if r.link == "inter":
            seconds = max(r.wire_bytes / hw.intra_node.effective, r.inter_bytes / hw.inter_node.effective) \
                + r.count * hw.inter_node.latency_s
        by_group[r.group] = by_group.get(r.group, 0.0) + seconds
        if r.phase in _OVERLAP_PHASES and r.group not in _EXPOSED_GROUPS:
            overlappable += seconds
        else:
            exposed += seconds
    return exposed, overlappable, by_group


def estimate_step(probe: Any, llama: Any, *, seq_len: int, tp: int, sp: int, world_size: int, dp: int,
                  checkpointing: bool, bubble: float, dtype: str, hw: HardwareProfile,
                  activation_bytes: int = 0, offload_optimizer: bool = False,
                  offload_param: bool = False) -> StepTime:
    """Step time of ``probe``'s rank (see [Note: step-time model]); ``activation_bytes``: what one micro-batch
    saves for backward without checkpointing."""
    tokens_rank = probe.micro_batch * probe.gas * seq_len // sp
    embedding = llama.vocab_size * llama.dim // tp if (probe.coords["pp"] == 0) else 0
    matmul_params = probe.local_params - embedding
    attention = 12.0 * probe.n_layers * llama.dim * seq_len * tokens_rank / tp
    model_flops = 6.0 * matmul_params * tokens_rank + attention
    hw_flops = model_flops + ((2.0 * matmul_params * tokens_rank + attention / 3) if checkpointing else 0.0)
    peak = hw.peak_flops.get(dtype, hw.peak_flops["bf16"])
    elementwise = (6 if checkpointing else 4) * activation_bytes * probe.gas / hw.hbm_bytes_per_s
    compute = hw_flops / (peak * hw.matmul_efficiency) + elementwise
    stretched = compute / (1.0 - bubble) if bubble < 1 else float("inf")
    exposed, overlappable, by_group = _comm(probe.traffic, hw)
    if offload_param:
        overlappable += 2 * probe.gas * probe.memory.get("parameters", 0) / hw.pcie_bytes_per_s
    hidden = min(overlappable, compute)
    owned = probe.memory.get("master_weights", 0) / 4
    if offload_optimizer:
        optimizer = owned * 24 / hw.host_bytes_per_s + owned * (probe.grad_bytes + probe.param_bytes) \
            / hw.pcie_bytes_per_s
    else:
        optimizer = owned * (8 + 16 + probe.grad_bytes + probe.param_bytes) / hw.hbm_bytes_per_s
    step = stretched + exposed + (overlappable - hidden) + optimizer
    tokens_step = probe.micro_batch * probe.gas * dp * seq_len
    params = llama_parameters(llama)
    per_token = model_flops_per_token(params, llama.vocab_size, llama.dim, llama.n_layers, seq_len)
    mfu = per_token * tokens_step / (step * peak * world_size)
    return StepTime(compute, elementwise, stretched - compute, exposed + overlappable - hidden, hidden, optimizer, step,
                    per_token, tokens_step, tokens_step / step / world_size, mfu, by_group)
