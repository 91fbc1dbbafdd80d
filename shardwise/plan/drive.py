"""Run one training step of a built engine on the meta device and record what it communicates, by phase.

The engine's own forward, its strategy's backward hooks and reductions, the pipeline schedule and executor run
unchanged; collectives go through ``shardwise.comm`` to the fake backend, so the comms log records each one with
its true size and group. Three stand-ins, each because a meta tensor has no value:

* the loss is never read (``Engine.backward`` logs ``float(loss)``): ``_micro_step`` calls a plain
  ``loss.backward()`` with the accumulation boundary set through ``set_gradient_accumulation_boundary``, so the
  engine's backward hooks (``engine/backward_hooks.py``) begin and end the pass as they do for a user's;
* the optimizer step (``_meta_step``) is ``Engine._take_model_step`` without reading the gradient norm: the same
  norm all-reduces, ``scale_grads``, ``optimizer_step`` (the real optimizer, whose state is allocated on meta),
  ``zero_grad``;
* pipeline transfers (``PlanP2P``): the handshake header cannot be decoded, so the receiver is told the boundary
  tensor's shape (the hidden state); sends and receives still go through the comms log.

Every micro-batch of a window sends the same, so a window of ``gas`` micro-steps is replayed as two or three
(``run_window``) and a pipeline batch as two micro-batches through the real schedule and executor (``p`` with
interleaving), their traffic scaled to the full count; the bubble comes from the full schedule (``pipeline.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from shardwise import comm
from shardwise.comm import COMMS_LOG
from shardwise.engine import model_parallel
from shardwise.pipe.p2p import META_SLOTS, P2P, TensorMeta

if TYPE_CHECKING:
    from shardwise.comm.topology import Topology
    from shardwise.engine.engine import Engine



@dataclass
class Traffic:
    """Totals of one (phase, op, group) over a step."""

    count: float = 0.0
    msg_bytes: float = 0.0
    wire_bytes: float = 0.0


class Recorder:
    """Moves the comms log's totals into per-phase records at every phase switch."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str, str], Traffic] = {}
        self._phase: str | None = None
        self._weight = 1.0
        COMMS_LOG.reset()

    def switch(self, phase: str | None, weight: float = 1.0) -> None:
        """Close the current phase (scaled by its weight) and open ``phase``."""
        if self._phase is not None:
            for (op, group), s in COMMS_LOG.stats.items():
                t = self.records.setdefault((self._phase, op, group), Traffic())
                t.count += s.count * self._weight
                t.msg_bytes += s.msg_bytes * self._weight
                t.wire_bytes += s.wire_bytes * self._weight
        COMMS_LOG.reset()
        self._phase, self._weight = phase, weight

    @contextlib.contextmanager
    def phase(self, name: str, weight: float = 1.0) -> Iterator[None]:
        """Record the body under ``name``."""
        self.switch(name, weight)
        try:
            yield
        finally:
            self.switch(None)


class _Discard(Recorder):
    """A recorder for warm-up steps: drops everything."""

    def switch(self, phase: str | None, weight: float = 1.0) -> None:
        COMMS_LOG.reset()


def _meta_step(engine: Engine) -> None:
    """``Engine._take_model_step`` minus the scalar reads (see the module docstring)."""
    s, topo = engine.strategy, engine.topology
    s.finish_gradients()
    model_parallel.sync_sequence_parallel_grads(s, engine.module, topo)
    norm_sq = s.local_grad_norm_sq().to(torch.float64)
    excluded = engine._norm_excluded_params()
    if excluded:
        norm_sq = norm_sq - model_parallel.grad_norm_sq(s, excluded)
    if s.norm_is_partitioned:
        comm.all_reduce(norm_sq, group=topo.zero_group)
    comm.all_reduce(norm_sq, group=topo.model_parallel_group)
    s.scale_grads(0.5)
    _allow_meta_host_optimizer(s.optimizer)
    s.optimizer_step()
    s.zero_grad()


def _allow_meta_host_optimizer(optimizer: Any) -> None:
    """CPU Adam (ZeRO-Offload) refuses non-CPU tensors; in a fake world the host is the meta device too, so this
    one instance is told not to check (its state is then allocated on meta, with the real sizes)."""
    basic = getattr(optimizer, "basic", None)
    if basic is not None and type(basic).__name__ == "CPUAdam":
        basic._check_param = lambda p: None


def _micro_step(engine: Engine, batch: tuple, boundary: bool, rec: Recorder, weight: float) -> None:
    with rec.phase("forward", weight):
        loss = engine(*batch)
    with rec.phase("backward", weight):
        engine.set_gradient_accumulation_boundary(boundary)  # the engine's own backward hooks begin and end the
        try:  # pass (engine/backward_hooks.py), as for a user's plain loss.backward()
            loss.backward()
        finally:
            engine.set_gradient_accumulation_boundary(None)


def run_window(engine: Engine, batch: tuple, gas: int, rec: Recorder, distinct_middle: bool = False) -> None:
    """One optimizer step of ``gas`` micro-batches, replayed as: the first micro-step (weighted ``gas - 1`` when the
    middle ones send the same), a middle one (weighted ``gas - 2``) when ``distinct_middle`` (hpZ: only the first
    forward after a step crosses nodes), and the last, which reduces; then the optimizer step."""
    if gas == 1:
        pattern = [(True, 1.0)]
    elif distinct_middle and gas > 2:
        pattern = [(False, 1.0), (False, float(gas - 2)), (True, 1.0)]
    else:
        pattern = [(False, float(gas - 1)), (True, 1.0)]
    for boundary, weight in pattern:
        _micro_step(engine, batch, boundary, rec, weight)
    with rec.phase("step"):
        _meta_step(engine)


def drive_engine(engine: Engine, batch: tuple, gas: int, zero3: bool, hpz: bool) -> Recorder:
    """ZeRO-3: a one-micro-batch warm-up step first (it learns its prefetch order, which decides which gathers
    backward can skip); then the recorded step."""
    if zero3:
        run_window(engine, batch, 1, _Discard())
    rec = Recorder()
    run_window(engine, batch, gas, rec, distinct_middle=hpz)
    return rec


# -- pipelines --------------------------------------------------------------------------------------------------------
class PlanP2P(P2P):
    """Pipeline transfers on the fake backend: the receiver knows the boundary tensor instead of decoding it."""

    def __init__(self, topology: Topology, *, pipe_partitioned: bool, grad_partitioned: bool, boundary: TensorMeta,
                 replicated: bool) -> None:
        super().__init__(topology, pipe_partitioned=pipe_partitioned, grad_partitioned=grad_partitioned)
        self.boundary = boundary
        self.replicated = replicated
        self.topology = topology
        #: messages and bytes this rank sends, by link: "intra" (same node) or "inter"; handshake headers apart
        self.sent: dict[str, list[float]] = {"intra": [0, 0], "inter": [0, 0]}
        self.headers: dict[str, list[float]] = {"intra": [0, 0], "inter": [0, 0]}

    def _replicated(self, tensors: tuple[torch.Tensor, ...]) -> list[bool]:
        return [self.replicated] * len(tensors)

    def recv(self, src: int, tag: int, device: torch.device, *, grads: bool = False) -> tuple[torch.Tensor, ...]:
        key = (src, tag, torch.is_grad_enabled())
        if key not in self._received:
            comm.recv(torch.empty(META_SLOTS, dtype=torch.int64), src, group=self.pp_group, tag=tag)
            split = (self.split_grads if grads else self.split_activations) and self.replicated
            b = self.boundary
            self._received[key] = [TensorMeta(b.dtype, b.shape, not grads, split)]
        return super().recv(src, tag, device, grads=grads)

    def _isend(self, t: torch.Tensor, dst: int, tag: int) -> None:
        same = self.topology.node_of(dst) == self.topology.node_of(self.topology.rank)
        header = t.dtype == torch.int64 and t.numel() == META_SLOTS
        entry = (self.headers if header else self.sent)["intra" if same else "inter"]
        entry[0] += 1
        entry[1] += t.numel() * t.element_size()
        super()._isend(t, dst, tag)


def replayed_micro_batches(micro_batches: int, stages: int, chunks: int) -> int:
    """How many micro-batches a pipeline probe runs: every micro-batch sends the same, so two (a multiple of the
    stages with interleaving, which needs it) stand for all of them."""
    return min(micro_batches, stages if chunks > 1 else 2)


def drive_pipeline(engine: Engine, batch: tuple, p2p: PlanP2P) -> tuple[Recorder, float]:
    """One ``train_batch`` through the real schedule and executor, phases: pipeline, reduce, step. Returns the
    recorder and the factor the replayed micro-batches' traffic was scaled by (already applied in the recorder)."""
    rec = Recorder()
    engine.p2p = engine.executor.p2p = p2p
    m = engine.micro_batches
    engine.micro_batches = replayed = replayed_micro_batches(m, engine.num_stages, engine.module.virtual_stages)
    scale = m / replayed
    reduce_tied, reduce_grads = engine._reduce_tied_grads, engine._reduce_grads

    def in_phase(fn: Any, name: str) -> Any:
        def run(*args: Any) -> Any:
            rec.switch(name)
            try:
                return fn(*args)
            finally:
                rec.switch("pipeline", scale)
        return run

    def optimizer_step(result: Any) -> None:
        engine.agg_train_loss = engine._aggregate_loss(result.losses)
        _meta_step(engine)

    engine._reduce_tied_grads = in_phase(reduce_tied, "reduce")
    engine._reduce_grads = in_phase(reduce_grads, "reduce")
    engine._optimizer_step = in_phase(optimizer_step, "step")
    rec.switch("pipeline", scale)
    try:
        engine.train_batch(iter([batch] * replayed))
    finally:
        engine.micro_batches = m
    rec.switch(None)
    return rec, scale
