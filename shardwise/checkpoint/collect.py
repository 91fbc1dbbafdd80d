"""``snapshot``: everything one rank contributes to a checkpoint, as safetensors entries plus a JSON index.

The index is the rank's part of the manifest (see ``files.build_manifest``): for each tensor of the model its full
shape and dtype and the pieces this rank writes; the rank's coordinates and RNG scalars; and on rank 0 the global
fields (layout, counters, loss scaler, scheduler, optimizer hyperparameters and scalar state, ``client_state``).

With ``copy=True`` (asynchronous saves) every entry is copied to host memory here, so training may modify the live
tensors while a background thread writes; otherwise entries are views written directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

import shardwise
from shardwise.checkpoint import codec, model_view, optim_state, rng
from shardwise.checkpoint.errors import CheckpointError
from shardwise.checkpoint.files import TensorSpec, dtype_name

if TYPE_CHECKING:
    from shardwise.engine.engine import Engine


META_PREFIX = "meta."


@dataclass
class RankSnapshot:
    """One rank's shard entries and its JSON index."""

    specs: list[TensorSpec] = field(default_factory=list)
    index: dict[str, Any] = field(default_factory=dict)
    _keys: set[str] = field(default_factory=set)

    def add(self, key: str, tensor: torch.Tensor, copy: bool) -> None:
        """Add one entry (copied to host memory when ``copy``)."""
        if key in self._keys:
            raise CheckpointError(f"internal error: two checkpoint entries named {key!r}")
        self._keys.add(key)
        t = tensor.detach()
        if copy:
            t = t.to("cpu", copy=True)
        self.specs.append(TensorSpec.of(key, t))

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this rank writes."""
        return sum(s.nbytes for s in self.specs)


def _piece(snap: RankSnapshot, entry: dict, kind: str, mt: model_view.ModelTensor, value: torch.Tensor,
           flat: tuple[int, int], copy: bool) -> None:
    """Record elements ``flat`` of this rank's local ``mt`` (values ``value``), one piece per tensor-parallel box."""
    pieces = entry["pieces"].setdefault(kind, [])
    value = value.reshape(-1)
    for box, run in mt.runs(flat):
        key = f"{kind}/{mt.name}" + (f"#{len(pieces)}" if pieces else "")
        snap.add(key, model_view.run_view(value, run).reshape(-1), copy)
        piece = {"key": key, "flat": [int(run.box_range[0]), int(run.box_range[1])]}
        if box is not None:
            piece["box"] = [list(b) for b in box]
        pieces.append(piece)
    entry["dtypes"][kind] = dtype_name(value.dtype)


def _tensor_entries(engine: Engine, view: model_view.ModelView, snap: RankSnapshot, exclude_frozen: bool,
                    copy: bool) -> None:
    tensors, aliases, extra = view
    frag_writer = model_view.writes_fragments(engine)
    replica_writer = model_view.writes_replicated(engine)
    index: dict[str, dict] = {}
    excluded: list[str] = []
    pp = engine.topology.size("pp") > 1
    for mt in tensors:
        if exclude_frozen and mt.is_param and not mt.tensor.requires_grad:
            excluded.append(mt.name)
            continue
        entry = {"shape": list(mt.shape), "dtype": dtype_name(mt.tensor.dtype),
                 "kind": "param" if mt.is_param else "buffer", "trainable": bool(mt.tensor.requires_grad),
                 "dtypes": {}, "pieces": {}}
        if pp:
            entry["stage"] = engine.topology.coord("pp")
        index[mt.name] = entry
        if not model_view.writes_tensor(engine, mt):
            continue
        if mt.managed:
            if frag_writer:
                _fragment_pieces(engine, snap, entry, mt, copy)
        elif replica_writer:
            t = mt.tensor.detach()
            _piece(snap, entry, "value", mt, t, (0, t.numel()), copy)
    snap.index.update(tensors=index, aliases=aliases, excluded=excluded)
    if extra:
        sink = _Sink(snap, copy)
        snap.index["module_extra"] = codec.encode(extra, sink, f"{META_PREFIX}extra.", "module extra state")


def _fragment_pieces(engine: Engine, snap: RankSnapshot, entry: dict, mt: model_view.ModelTensor, copy: bool) -> None:
    for frag in engine.strategy.fragments(mt.tensor):
        flat = (frag.start, frag.end)
        if frag.fp32 is not None:
            _piece(snap, entry, "fp32", mt, frag.fp32, flat, copy)
        if frag.model is not None and (frag.fp32 is None or frag.model.dtype != torch.float32):
            _piece(snap, entry, "model", mt, frag.model, flat, copy)
        for key, value in frag.state.items():
            _piece(snap, entry, f"optim.{key}", mt, value, flat, copy)


class _Sink(dict):
    """A dict that codec.encode fills with tensors; each lands in the snapshot as an entry."""

    def __init__(self, snap: RankSnapshot, copy: bool) -> None:
        super().__init__()
        self._snap, self._copy = snap, copy

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        super().__setitem__(key, value)
        self._snap.add(key, value, self._copy)


def _layout(engine: Engine) -> dict[str, Any]:
    topo, strategy = engine.topology, engine.strategy
    return {"world_size": topo.world_size, "axes": {a: topo.size(a) for a in ("pp", "dp", "sp", "tp")},
            "zero_stage": engine.zero_optimization_stage(),
            "state_group_size": strategy.state_group.size if strategy is not None else 1,
            "partitioned": strategy is not None and strategy.policy.partitioned,
            "offload_optimizer": strategy is not None and strategy.policy.offload_optimizer,
            "strategy": strategy.describe() if strategy is not None else None,
            "model_dtype": dtype_name(next((p.dtype for p in engine.module.parameters()), torch.float32))}


def _global_fields(engine: Engine, client_state: dict, sink: _Sink) -> dict[str, Any]:
    basic = engine.strategy.optimizer.basic if engine.strategy is not None else None
    sched = engine.lr_scheduler
    return {
        "shardwise_version": shardwise.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "layout": _layout(engine),
        "engine": {**{k: int(getattr(engine, k)) for k in ("global_steps", "global_samples", "micro_steps",
                                                           "skipped_steps")},
                   "gradient_accumulation_steps": engine.gradient_accumulation_steps()},
        "scaler": {"type": type(engine.scaler).__name__,
                   "state": codec.encode(engine.scaler.state_dict(), sink, f"{META_PREFIX}scaler.", "loss scaler")},
        "lr_scheduler": None if sched is None or not hasattr(sched, "state_dict") else {
            "type": type(sched).__name__,
            "state": codec.encode(sched.state_dict(), sink, f"{META_PREFIX}sched.", "lr_scheduler.state_dict()")},
        "optimizer": None if basic is None else {
            "type": type(basic).__name__, "groups": optim_state.group_scalars(basic),
            "param_groups": [codec.encode({k: v for k, v in g.items() if k != "params"}, sink,
                                          f"{META_PREFIX}hyper.", f"optimizer param_groups[{i}]")
                             for i, g in enumerate(basic.param_groups)]},
        "client_state": codec.encode(client_state, sink, f"{META_PREFIX}client.", "client_state"),
        "data_efficiency": codec.encode(_data_efficiency_state(engine), sink, f"{META_PREFIX}data.",
                                        "data_efficiency state"),
        "config": engine.config.as_written(),
    }


def _data_efficiency_state(engine: Engine) -> dict[str, Any]:
    """Curriculum sampler / schedule and random-LTD states (empty when none is on; see shardwise/data/)."""
    return engine.data_efficiency_state_dict()


def snapshot(engine: Engine, view: model_view.ModelView, *, client_state: dict, exclude_frozen: bool, copy: bool,
             rank: int) -> RankSnapshot:
    """Collect this rank's contribution to a checkpoint (``copy``: detach it from live training tensors).

    ``view`` is ``model_view.named_tensors(engine)`` (a collective, so the caller runs it outside error handling).
    No collectives here: a failure on one rank cannot desynchronise the others.
    """
    if not isinstance(client_state, dict):
        raise CheckpointError(f"client_state must be a dict, got {type(client_state).__name__}")
    snap = RankSnapshot()
    snap.index["rank"] = rank
    snap.index["coords"] = {a: engine.topology.coord(a) for a in ("pp", "dp", "sp", "tp")}
    _tensor_entries(engine, view, snap, exclude_frozen, copy)
    rng_tensors, rng_meta = rng.capture()
    for key, t in rng_tensors.items():
        snap.add(key, t, copy=False)  # already fresh copies
    snap.index["rng"] = rng_meta
    # every rank encodes the global fields so that a bad client_state fails on all ranks alike; rank 0 keeps them
    global_fields = _global_fields(engine, client_state, _Sink(snap, copy) if rank == 0 else {})
    if rank == 0:
        snap.index["global"] = global_fields
    return snap
