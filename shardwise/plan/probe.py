"""Probe one rank: build its engine with the engine's own build path inside a fake world, run one step, measure.

``probe_rank`` is "rank r of N" for the length of one call: the ``Topology`` of the whole grid (every group of
every family is created, as on a real job), this rank's part of the model on the meta device, ``build_engine`` /
``build_pipeline_engine`` exactly as ``shardwise.initialize`` calls them, one recorded training step
(``drive.py``), then ``engine.memory_breakdown()`` (after the step, so optimizer state exists) and the comms log
sorted by phase and group. Nothing is allocated: a 405B-parameter rank costs a few hundred MB of Python objects.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from shardwise.plan.drive import PlanP2P, drive_engine, drive_pipeline
from shardwise.plan.fake_world import fake_world
from shardwise.plan.models import ModelSource

if TYPE_CHECKING:
    from shardwise.comm.topology import Topology
    from shardwise.config import ShardwiseConfig



@dataclass(frozen=True)
class ProbeSetup:
    """Everything a probe needs besides the rank (one per plan, shared by the sampled ranks)."""

    source: ModelSource
    world_size: int
    gpus_per_node: int
    ds_config: dict[str, Any]
    tp: int = 1
    pp: int = 1
    sp: int = 1
    virtual_stages: int = 1
    sequence_parallel: bool = False
    seq_len: int = 4096
    checkpointing: bool = False


@dataclass
class TrafficRow:
    """Bytes of one (phase, op, group) in one training step, from the comms log (or the pipeline's sends)."""

    phase: str  # forward / backward / step (plain engine); pipeline / reduce / step (pipeline engine)
    op: str
    group: str
    group_size: int
    nodes: int  # nodes the group's members sit on
    link: str  # "intra" (one node) or "inter"
    count: float
    msg_bytes: float
    wire_bytes: float  # what this rank sends on a ring (see comm/comms_log.py)
    inter_bytes: float = 0.0  # what crosses this rank's network port (see [Note: inter-node bytes])


@dataclass
class RankProbe:
    """What one sampled rank holds and sends."""

    rank: int
    coords: dict[str, int]
    node: int
    memory: dict[str, int]  # engine.memory_breakdown() after one step
    local_params: int  # parameter elements of this rank's model part (before ZeRO partitions them)
    n_layers: int  # decoder blocks on this rank
    has_head: bool
    receives_boundary: bool
    strategy: str
    param_bytes: int  # bytes per element of the model dtype
    grad_bytes: int  # bytes per element of gradient accumulation
    largest_unit: int = 0  # ZeRO-3: elements of the largest gathered unit
    bucket_numel: int = 0  # stages 0-2: reduction bucket size
    max_inflight: int = 0  # reductions (buckets or ZeRO-3 units) in flight at once
    stage: int = 0  # ZeRO stage
    hpz_secondary: int = 0  # ZeRO++ hpZ: bytes of the node-local secondary partitions every unit keeps cached
    micro_batch: int = 1
    gas: int = 1
    traffic: list[TrafficRow] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def _config(setup: ProbeSetup, dp: int) -> Any:
    from shardwise.config import load_config

    raw = dict(setup.ds_config)
    if not any(k in raw for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        raw["train_micro_batch_size_per_gpu"] = 1
    return load_config(raw, dp_world_size=dp, log=False)


def _layers_on_rank(model: Any, setup: ProbeSetup) -> tuple[int, bool, bool]:
    """(decoder blocks, holds the LM head, receives a pipeline activation) for this rank's model part."""
    if setup.pp == 1:
        n = setup.source.llama.n_layers if setup.source.llama is not None else 0
        return n, True, False
    names = [type(m).__name__ for m in model.modules()]
    return names.count("BlockPipe"), "NormHeadPipe" in names, model.stage_id > 0


_METADATA_OPS = ("all_gather_object", "broadcast_object", "barrier")


def _group_span(topology: Topology, name: str) -> tuple[int, int, int]:
    """(members, nodes they sit on, members on this rank's node)."""
    try:
        ranks = topology.group(name).ranks
    except KeyError:
        ranks = tuple(range(topology.world_size))
    here = topology.node_of(topology.rank)
    return len(ranks), len({topology.node_of(r) for r in ranks}), sum(topology.node_of(r) == here for r in ranks)


def inter_node_bytes(op: str, msg: float, wire: float, size: int, nodes: int, local: int) -> float:
    """Bytes one rank's network port carries for a collective over a group spanning ``nodes`` nodes.

    [Note: inter-node bytes] Of a gathered (or reduced) buffer of ``msg`` bytes, the ``(nodes - 1) / nodes`` that
    lives on other nodes must enter each node once; a node's ``local`` members share that across their own ports
    (NCCL runs one ring per port, each crossing between nodes once), so each port carries
    ``msg (nodes - 1) / nodes / local``: the lower bound, which rings and trees reach. An all-reduce is a
    reduce-scatter and an all-gather (twice that); an all-to-all cannot be aggregated (``msg`` x the share of peers
    on other nodes). A point-to-point send crosses in full when its peer is on another node.
    """
    if nodes <= 1:
        return 0.0
    share = (nodes - 1) / nodes / max(local, 1)
    if op in ("all_gather", "reduce_scatter", "broadcast", "reduce"):
        return msg * share
    if op == "all_reduce":
        return 2 * msg * share
    if op == "all_to_all":
        return msg * (size - local) / size
    return wire


def _rows(rec: Any, topology: Topology, p2p: PlanP2P | None, scale: float) -> list[TrafficRow]:
    rows = []
    for (phase, op, group), t in sorted(rec.records.items()):
        if not t.count or op in _METADATA_OPS or (op in ("send", "recv") and p2p is not None):
            continue  # object collectives: one-off consistency checks; sends: split by link below
        size, nodes, local = _group_span(topology, group)
        rows.append(TrafficRow(phase, op, group, size, nodes, "intra" if nodes == 1 else "inter", t.count,
                               t.msg_bytes, t.wire_bytes,
                               inter_node_bytes(op, t.msg_bytes, t.wire_bytes, size, nodes, local)))
    if p2p is not None:
        size, nodes, _ = _group_span(topology, "pp")
        for link, (count, nbytes) in p2p.sent.items():  # steady state: the one-off shape handshake is left out
            count, nbytes = count * scale, nbytes * scale
            if count:
                rows.append(TrafficRow("pipeline", "send", "pp", size, nodes, link, count, nbytes, nbytes,
                                       nbytes if link == "inter" else 0.0))
    return rows


def _boundary(setup: ProbeSetup, config: ShardwiseConfig, dtype: torch.dtype) -> tuple[Any, bool]:
    from shardwise.pipe.p2p import TensorMeta

    seq = setup.seq_len // (setup.tp if setup.sequence_parallel else 1)
    shape = (config.train_micro_batch_size_per_gpu, seq, setup.source.llama.dim)
    return TensorMeta(dtype, shape, True, False), not setup.sequence_parallel


def _run(setup: ProbeSetup, rank: int) -> RankProbe:
    from shardwise.comm.topology import Topology
    from shardwise.engine.build import build_engine
    from shardwise.engine.precision import model_dtype
    from shardwise.zero.stage3 import Stage3Strategy

    topo = Topology(pp=setup.pp, tp=setup.tp, sp=setup.sp, world_size=setup.world_size, rank=rank,
                    local_world_size=setup.gpus_per_node)
    config = _config(setup, topo.size("dp"))
    model = setup.source.build(topo, seq_len=setup.seq_len, checkpointing=setup.checkpointing,
                               sequence_parallel=setup.sequence_parallel, virtual_stages=setup.virtual_stages)
    local_params = sum(p.numel() for p in model.parameters())
    n_layers, has_head, receives = _layers_on_rank(model, setup)
    mb, gas = config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps
    tokens = torch.zeros(mb, setup.seq_len // setup.sp, dtype=torch.long, device="meta")
    p2p = None
    if setup.pp > 1:
        from shardwise.pipe.engine import build_pipeline_engine

        engine = build_pipeline_engine(module=model, config=config, topology=topo)
        boundary, replicated = _boundary(setup, config, model_dtype(config))
        pc = config.pipeline
        p2p = PlanP2P(topo, pipe_partitioned=pc.pipe_partitioned, grad_partitioned=pc.grad_partitioned,
                      boundary=boundary, replicated=replicated)
        rec, scale = drive_pipeline(engine, (tokens, tokens), p2p)
    else:
        engine = build_engine(module=model, config=config, topology=topo)
        zc = config.zero_optimization
        hpz = 1 < int(zc.zero_hpz_partition_size or 1) < topo.zero_group.size
        rec, scale = drive_engine(engine, (tokens, tokens), gas, zc.stage == 3, hpz and zc.stage == 3), 1.0
    strategy = engine.strategy
    policy = strategy.policy
    probe = RankProbe(
        rank=rank, coords=dict(topo.coords), node=topo.node_of(rank), memory=dict(engine.memory_breakdown()),
        local_params=local_params, n_layers=n_layers, has_head=has_head, receives_boundary=receives,
        strategy=strategy.describe(), param_bytes=model_dtype(config).itemsize,
        grad_bytes=policy.grad_dtype.itemsize, max_inflight=policy.max_inflight, stage=policy.stage,
        micro_batch=mb, gas=gas, traffic=_rows(rec, topo, p2p, scale))
    if isinstance(strategy, Stage3Strategy):
        probe.largest_unit = max((u.numel for u in strategy.units), default=0)
        intra = getattr(strategy.shard_comm, "intra", None)
        if intra is not None:  # each unit caches 1/intra of itself after its first gather, until the next step
            probe.hpz_secondary = sum(u.layout.total // intra.size * u.dtype.itemsize for u in strategy.units)
    else:
        probe.bucket_numel = policy.bucket_numel
    if strategy is not None:
        strategy.remove_hooks()
    return probe


def probe_rank(setup: ProbeSetup, rank: int) -> RankProbe:
    """Build and step global rank ``rank`` of the planned job on the fake backend; see the module docstring."""
    start = time.perf_counter()
    with fake_world(rank, setup.world_size):
        probe = _run(setup, rank)
    gc.collect()
    probe.seconds = time.perf_counter() - start
    return probe
