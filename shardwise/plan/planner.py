"""``plan_layout``: will this layout fit, what does it send where, how long will a step take?

For a model, a world size, a node size, a ds_config and tensor / pipeline / sequence degrees, the planner

1. probes a sample of ranks (first and last pipeline stage x first and last tensor rank, data and sequence
   coordinate 0; or the ranks asked for) with the engine's own build path on the fake backend (``probe.py``):
   model-state bytes from ``engine.memory_breakdown()``, per-step traffic from the comms log;
2. adds the activations of the micro-batches a stage keeps in flight (``activations.py`` x the real schedule's
   in-flight count, ``pipeline.py``) and the transient buffers of its ZeRO strategy (``buffers.py``);
3. compares the peak with the device memory of a hardware profile, and estimates the step time (``step_time.py``).

The result is a ``Plan``: per-rank numbers, the pipeline bubble, the verdict with its arithmetic, as a table
(``report.render``) or JSON (``Plan.as_dict``).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardwise.comm import grid
from shardwise.plan import buffers
from shardwise.plan.activations import ActivationSetup, MicroBatchActivations, micro_batch_activations
from shardwise.plan.hardware import HardwareProfile, load_profile
from shardwise.plan.models import ModelSource, resolve_model
from shardwise.plan.pipeline import PipelineCost, pipeline_cost
from shardwise.plan.probe import ProbeSetup, RankProbe, probe_rank
from shardwise.plan.step_time import StepTime, estimate_step

_GIB = 2**30


class PlanError(ValueError):
    """The requested layout cannot be planned; the message names the argument and the fix."""


@dataclass
class RankPlan:
    """One sampled rank's memory and time."""

    probe: RankProbe
    device_states: dict[str, int]  # model states on the device, by kind
    host_states: int  # offloaded model-state bytes
    activations: dict[str, MicroBatchActivations]  # "configured", "none", "checkpointed", "partitioned"
    in_flight: int  # micro-batches whose activations are alive at the peak
    buffers: dict[str, int]  # transient device buffers, by kind
    peak: int
    fits: bool
    arithmetic: str
    step: StepTime | None = None


@dataclass
class Plan:
    """The answer for one layout."""

    summary: dict[str, Any]
    ranks: list[RankPlan]
    pipeline: PipelineCost
    hardware: HardwareProfile
    fits: bool
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    max_rss: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (see ``report.plan_json``)."""
        from shardwise.plan.report import plan_json

        return plan_json(self)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    log = logging.getLogger("shardwise")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def sample_ranks(sizes: dict[str, int]) -> list[int]:
    """First and last pipeline stage x first and last tensor rank (data and sequence coordinate 0)."""
    ranks = []
    for pp in sorted({0, sizes["pp"] - 1}):
        for tp in sorted({0, sizes["tp"] - 1}):
            ranks.append(grid.rank_of({"pp": pp, "dp": 0, "sp": 0, "tp": tp}, sizes))
    return ranks


def _check(source: ModelSource, world: int, gpus_per_node: int, tp: int, pp: int, sp: int,
           sequence_parallel: bool) -> dict[str, int]:
    if gpus_per_node < 1 or world < 1:
        raise PlanError(f"world size ({world}) and gpus per node ({gpus_per_node}) must be positive")
    try:
        sizes = grid.resolve_sizes(world, pp=pp, tp=tp, sp=sp)
    except grid.GridError as exc:
        raise PlanError(f"{exc} (--world_size {world}, --tp {tp}, --pp {pp}, --sp {sp})") from None
    if (tp > 1 or pp > 1 or sp > 1) and not source.supports_model_parallel:
        raise PlanError(f"{source.name}: tensor, pipeline and sequence parallelism need the LLaMA reference model "
                        "(a preset or a llama/mistral config.json); use --tp 1 --pp 1 --sp 1 for this model")
    if sequence_parallel and tp == 1:
        raise PlanError("--sequence_parallel (Megatron) needs --tp > 1")
    return sizes


def _dtype(ds: dict[str, Any]) -> str:
    for name in ("bf16", "fp16"):
        section = ds.get(name) or ({} if name != "fp16" else ds.get("float16") or {})
        if isinstance(section, dict) and section.get("enabled"):
            return name
    return "fp32"


def _on_host(ds: dict[str, Any]) -> set[str]:
    """Model-state kinds ZeRO-Offload keeps on the host."""
    zc = ds.get("zero_optimization") or {}
    on_host = set()
    if ((zc.get("offload_optimizer") or {}).get("device") or "none") != "none":
        on_host |= {"master_weights", "optimizer_states"}
    if ((zc.get("offload_param") or {}).get("device") or "none") != "none":
        on_host.add("parameters")
    return on_host


def _split_states(memory: dict[str, int], ds: dict[str, Any]) -> tuple[dict[str, int], int]:
    on_host = _on_host(ds)
    device = {k: (0 if k in on_host else v) for k, v in memory.items()}
    return device, sum(v for k, v in memory.items() if k in on_host)


def _activations(source: ModelSource, probe: RankProbe, setup: ProbeSetup, dtype_bytes: int,
                 ckpt: dict[str, Any]) -> dict[str, MicroBatchActivations]:
    if source.llama is None:
        return {}
    base = ActivationSetup(dtype_bytes, setup.tp, setup.sequence_parallel, setup.sp)

    def at(**kw: Any) -> MicroBatchActivations:
        s = ActivationSetup(**{**base.__dict__, **kw})
        return micro_batch_activations(source.llama, s, probe.micro_batch, setup.seq_len, probe.n_layers,
                                       has_embedding=probe.coords["pp"] == 0, has_head=probe.has_head,
                                       receives_boundary=probe.receives_boundary)

    out = {"none": at(), "checkpointed": at(checkpointing=True)}
    if setup.tp > 1:
        out["partitioned"] = at(checkpointing=True, partition_activations=True)
    out["configured"] = at(checkpointing=setup.checkpointing,
                           partition_activations=bool(ckpt.get("partition_activations")),
                           cpu_checkpointing=bool(ckpt.get("cpu_checkpointing")))
    return out


def _gib(n: float) -> str:
    return f"{n / _GIB:.2f}"


def _arithmetic(rp: RankPlan, usable: int, hw: HardwareProfile) -> str:
    s = rp.device_states
    act = rp.activations.get("configured")
    parts = [f"model states {_gib(sum(s.values()))} (params {_gib(s['parameters'])} + grads "
             f"{_gib(s['gradients'])} + fp32 master {_gib(s['master_weights'])} + optimizer "
             f"{_gib(s['optimizer_states'])})"]
    if act is not None:
        parts.append(f"activations {rp.in_flight} micro-batch(es) x {_gib(act.resident)}"
                     + (f" + recompute {_gib(act.recompute)}" if act.recompute else ""))
    parts.append(f"buffers {_gib(sum(rp.buffers.values()))}")
    verb = "<=" if rp.fits else ">"
    return (f"peak {_gib(rp.peak)} GiB = " + " + ".join(parts) + f" {verb} usable {_gib(usable)} GiB "
            f"({_gib(hw.device_memory)} - {_gib(hw.reserved)} reserved)")


def _rank_plan(source: ModelSource, probe: RankProbe, setup: ProbeSetup, pipe: PipelineCost,
               hw: HardwareProfile, dtype: str) -> RankPlan:
    ds = setup.ds_config
    device, host = _split_states(probe.memory, ds)
    acts = _activations(source, probe, setup, probe.param_bytes, ds.get("activation_checkpointing") or {})
    in_flight = pipe.in_flight[probe.coords["pp"]]
    bufs = buffers.transient_buffers(probe, source, setup)
    act = acts.get("configured")
    act_bytes = in_flight * act.resident + act.recompute if act is not None else 0
    peak = sum(device.values()) + act_bytes + sum(bufs.values())
    rp = RankPlan(probe, device, host, acts, in_flight, bufs, peak, peak <= hw.usable_memory, "")
    rp.arithmetic = _arithmetic(rp, hw.usable_memory, hw)
    if source.llama is not None:
        rp.step = estimate_step(probe, source.llama, seq_len=setup.seq_len, tp=setup.tp, sp=setup.sp,
                                world_size=setup.world_size, dp=setup.world_size // (setup.tp * setup.pp * setup.sp),
                                checkpointing=setup.checkpointing, bubble=pipe.bubble, dtype=dtype, hw=hw,
                                activation_bytes=acts["none"].resident if acts else 0,
                                offload_optimizer="master_weights" in _on_host(ds),
                                offload_param="parameters" in _on_host(ds))
    return rp


def _notes(setup: ProbeSetup, ranks: list[RankPlan]) -> list[str]:
    notes = []
    seen = set()
    for rp in ranks:
        for row in rp.probe.traffic:
            key = (row.group, row.link)
            if row.link == "inter" and row.group in ("tp", "sp") and key not in seen:
                seen.add(key)
                notes.append(f"the {row.group} group ({row.group_size} ranks) spans {row.nodes} nodes: its "
                             "per-layer collectives cross the inter-node network; keep it within a node")
    zc = setup.ds_config.get("zero_optimization") or {}
    if zc.get("stage") == 3 and not zc.get("zero_hpz_partition_size") and any(
            r.link == "inter" and r.op == "all_gather" for rp in ranks for r in rp.probe.traffic
            if r.group == "dp+sp"):
        notes.append("ZeRO-3 gathers cross nodes in forward and backward; zero_hpz_partition_size = "
                     f"{setup.gpus_per_node} (hpZ) keeps backward gathers inside a node")
    return notes


def plan_layout(model: str | Any, world_size: int, *, ds_config: dict[str, Any] | None = None,
                gpus_per_node: int | None = None, tp: int = 1, pp: int = 1, sp: int = 1, virtual_stages: int = 1,
                sequence_parallel: bool = False, seq_len: int = 4096, checkpoint_activations: bool = False,
                hardware: str | HardwareProfile = "h100-sxm", ranks: Sequence[int] | None = None) -> Plan:
    """Plan one layout (see the module docstring). ``model``: a preset, a config.json path, ``module:function``,
    a ``LlamaConfig`` or a ``ModelSource``; ``ds_config``: a ds_config dict (batch keys per rank, as usual)."""
    start = time.perf_counter()
    source = resolve_model(model)
    hw = hardware if isinstance(hardware, HardwareProfile) else load_profile(hardware)
    node = gpus_per_node or hw.gpus_per_node
    sizes = _check(source, world_size, node, tp, pp, sp, sequence_parallel)
    ds = dict(ds_config or {})
    setup = ProbeSetup(source, world_size, node, ds, tp, pp, sp, virtual_stages, sequence_parallel, seq_len,
                       checkpoint_activations)
    chosen = list(ranks) if ranks else sample_ranks(sizes)
    bad = [r for r in chosen if not 0 <= r < world_size]
    if bad:
        raise PlanError(f"--ranks {bad} are outside 0..{world_size - 1}")
    with _quiet():
        probes = [probe_rank(setup, r) for r in chosen]
    gas = probes[0].gas
    pipe = pipeline_cost(pp, gas, virtual_stages, recompute=checkpoint_activations)
    dtype = _dtype(ds)
    plans = [_rank_plan(source, p, setup, pipe, hw, dtype) for p in probes]
    summary = {"model": source.name, "parameters": source.parameters(), "world_size": world_size,
               "gpus_per_node": node, "nodes": -(-world_size // node), **sizes, "virtual_stages": virtual_stages,
               "sequence_parallel": sequence_parallel, "seq_len": seq_len, "micro_batch": probes[0].micro_batch,
               "gradient_accumulation_steps": gas, "dtype": dtype,
               "zero_stage": (ds.get("zero_optimization") or {}).get("stage", 0),
               "checkpoint_activations": checkpoint_activations, "hardware": hw.name}
    result = Plan(summary, plans, pipe, hw, all(r.fits for r in plans), _notes(setup, plans))
    result.seconds = time.perf_counter() - start
    result.max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result
