"""A ``Plan`` as a text table (``render``) or as JSON (``plan_json``): the same numbers, the verdict first."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

_GIB = 2**30
_MB = 1e6


def plan_json(plan: Any) -> dict[str, Any]:
    """Every number of the plan, in bytes and seconds."""
    ranks = []
    for rp in plan.ranks:
        ranks.append({
            "rank": rp.probe.rank, "coords": rp.probe.coords, "node": rp.probe.node,
            "strategy": rp.probe.strategy, "local_parameters": rp.probe.local_params,
            "model_states": rp.probe.memory, "device_model_states": rp.device_states, "host_model_states":
            rp.host_states, "activations_per_micro_batch": {k: v.as_dict() for k, v in rp.activations.items()},
            "micro_batches_in_flight": rp.in_flight, "buffers": rp.buffers, "peak": rp.peak, "fits": rp.fits,
            "arithmetic": rp.arithmetic, "traffic": [asdict(t) for t in rp.probe.traffic],
            "traffic_by_link": traffic_by_link(rp.probe.traffic),
            "step_time": rp.step.as_dict() if rp.step else None, "probe_seconds": rp.probe.seconds,
        })
    hw = plan.hardware
    return {"summary": plan.summary, "fits": plan.fits, "verdict": verdict(plan), "notes": plan.notes,
            "hardware": {"name": hw.name, "device_memory": hw.device_memory, "reserved": hw.reserved,
                         "usable": hw.usable_memory},
            "pipeline": plan.pipeline.as_dict(), "ranks": ranks, "seconds": plan.seconds, "max_rss": plan.max_rss}


def traffic_by_link(rows: list[Any]) -> dict[str, float]:
    """Bytes per step: what this rank sends inside its node, and what crosses its network port."""
    out = {"intra": 0.0, "inter": 0.0}
    for r in rows:
        out["inter"] += r.inter_bytes
        out["intra"] += r.wire_bytes - r.inter_bytes
    return out


def verdict(plan: Any) -> str:
    """One line, plus the arithmetic of every rank that does not fit."""
    usable = plan.hardware.usable_memory / _GIB
    worst = max(plan.ranks, key=lambda r: r.peak)
    if plan.fits:
        return (f"FITS: the largest peak is {worst.peak / _GIB:.2f} GiB on rank {worst.probe.rank} "
                f"(usable {usable:.2f} GiB); {worst.arithmetic}")
    bad = [r for r in plan.ranks if not r.fits]
    lines = [f"DOES NOT FIT on {len(bad)} of {len(plan.ranks)} sampled ranks:"]
    lines += [f"  rank {r.probe.rank}: {r.arithmetic}" for r in bad]
    return "\n".join(lines)


def _g(n: float) -> str:
    return f"{n / _GIB:.2f}"


def _memory_table(plan: Any) -> list[str]:
    ranks = plan.ranks
    head = f"{'per rank (GiB)':<40}" + "".join(f"{'rank ' + str(r.probe.rank):>14}" for r in ranks)
    rows = [("coords pp/dp/sp/tp", ["/".join(str(r.probe.coords[a]) for a in ("pp", "dp", "sp", "tp"))
                                     for r in ranks]),
            ("parameters", [_g(r.device_states["parameters"]) for r in ranks]),
            ("gradients", [_g(r.device_states["gradients"]) for r in ranks]),
            ("fp32 master weights", [_g(r.device_states["master_weights"]) for r in ranks]),
            ("optimizer states", [_g(r.device_states["optimizer_states"]) for r in ranks]),
            ("= model states on device", [_g(sum(r.device_states.values())) for r in ranks]),
            ("model states on host (offload)", [_g(r.host_states) for r in ranks])]
    for key, label in (("none", "activations/micro-batch, no ckpt"), ("checkpointed", "  with checkpointing"),
                       ("partitioned", "  ckpt + partition_activations"), ("configured", "  as configured")):
        if all(key in r.activations for r in ranks) and ranks[0].activations:
            rows.append((label, [_g(r.activations[key].resident) for r in ranks]))
    rows += [("micro-batches in flight", [str(r.in_flight) for r in ranks]),
             ("buffers (gathers, buckets, hpZ, logits)", [_g(sum(r.buffers.values())) for r in ranks]),
             ("peak", [_g(r.peak) for r in ranks]),
             ("fits", ["yes" if r.fits else "NO" for r in ranks])]
    return [head] + [f"{label:<40}" + "".join(f"{v:>14}" for v in values) for label, values in rows]


def _traffic_table(rp: Any) -> list[str]:
    lines = [f"traffic per step, rank {rp.probe.rank} (msg: the full buffer of each op; wire: what this rank sends on "
             "a ring; network: what crosses its inter-node port):",
             f"  {'phase':<10}{'group':<12}{'size':>6}{'nodes':>6} {'link':<6}{'op':<16}{'count':>8}"
             f"{'msg MB':>12}{'wire MB':>12}{'network MB':>12}"]
    for t in rp.probe.traffic:
        lines.append(f"  {t.phase:<10}{t.group:<12}{t.group_size:>6}{t.nodes:>6} {t.link:<6}{t.op:<16}"
                     f"{t.count:>8.0f}{t.msg_bytes / _MB:>12.1f}{t.wire_bytes / _MB:>12.1f}"
                     f"{t.inter_bytes / _MB:>12.1f}")
    by = traffic_by_link(rp.probe.traffic)
    lines.append(f"  per step: {by['intra'] / _MB:,.1f} MB inside the node, {by['inter'] / _MB:,.1f} MB over the "
                 "inter-node network")
    return lines


def _step_lines(plan: Any) -> list[str]:
    timed = [r for r in plan.ranks if r.step is not None]
    if not timed:
        return []
    slow = max(timed, key=lambda r: r.step.step_s)
    s = slow.step
    return [f"step time on {plan.hardware.name} (slowest sampled rank {slow.probe.rank}; assumptions: "
            "docs/scale.md, [Note: step-time model]):",
            f"  compute {s.compute_s:.3f} s (memory-bound part {s.elementwise_s:.3f} s) + bubble {s.bubble_s:.3f} s "
            f"+ exposed communication "
            f"{s.exposed_comm_s:.3f} s + optimizer {s.optimizer_s:.3f} s = {s.step_s:.3f} s "
            f"(communication hidden behind compute: {s.hidden_comm_s:.3f} s)",
            f"  {s.tokens_per_step:,} tokens per step -> {s.tokens_per_s_per_device:,.0f} tokens/s per device, "
            f"MFU {100 * s.mfu:.1f}% ({s.model_flops_per_token / 1e9:.1f} GFLOP per token)"]


def render(plan: Any, traffic_ranks: int = 1) -> str:
    """The plan as text: layout, memory per sampled rank, traffic, pipeline, step time, verdict, notes."""
    s = plan.summary
    params = f"{s['parameters'] / 1e9:.2f}B parameters" if s["parameters"] else "parameters: see the probe"
    lines = [f"shardwise-plan: {s['model']} ({params}) on {s['world_size']:,} ranks ({s['nodes']} nodes x "
             f"{s['gpus_per_node']}): pp {s['pp']} x dp {s['dp']} x sp {s['sp']} x tp {s['tp']}"
             f"{' + Megatron SP' if s['sequence_parallel'] else ''}; ZeRO stage {s['zero_stage']}, {s['dtype']}; "
             f"sequence {s['seq_len']}, micro-batch {s['micro_batch']} x {s['gradient_accumulation_steps']} "
             f"accumulation; activation checkpointing {'on' if s['checkpoint_activations'] else 'off'}; "
             f"{plan.hardware.name} ({_g(plan.hardware.device_memory)} GiB, {_g(plan.hardware.reserved)} reserved)",
             ""] + _memory_table(plan) + [""]
    for rp in plan.ranks[:traffic_ranks]:
        lines += _traffic_table(rp) + [""]
    p = plan.pipeline
    if p.stages > 1:
        lines += [f"pipeline: {p.stages} stages x {p.chunks} chunk(s), {p.micro_batches} micro-batches: bubble "
                  f"{100 * p.bubble:.1f}% of the step (replayed schedule; closed form "
                  f"{100 * p.bubble_closed_form:.1f}%)"
                  f"; micro-batches in flight per stage: {' '.join(map(str, p.in_flight))}", ""]
    lines += _step_lines(plan)
    lines += ["", verdict(plan)]
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"planned in {plan.seconds:.1f} s, max RSS {plan.max_rss / 1e9:.2f} GB "
                 f"({len(plan.ranks)} ranks probed on the fake backend)")
    return "\n".join(lines)
