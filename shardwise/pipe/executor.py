"""``StageExecutor``: runs one rank's instruction stream (``schedule.py``) on real tensors.

It owns the per-batch buffers (each micro-batch's inputs, outputs, labels and received gradients, keyed by
(chunk, micro-batch)), calls the module for forwards, autograd for backwards, and ``p2p.P2P`` for transfers.
Reductions and the optimizer step are the engine's business: the executor calls back into it. It also measures
the time this rank spends computing (forward + backward), from which the benchmark derives the pipeline bubble.

Virtual stage ``c * p + s`` (chunk ``c`` of stage ``s``) receives activations from virtual stage ``c * p + s - 1``
and sends to ``c * p + s + 1``; messages on a link carry tag ``2 * receiving_virtual_stage + kind`` so
activations and gradients (and different chunks) never match each other's receives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from shardwise.pipe import schedule as S
from shardwise.pipe.p2p import as_tensor_tuple

if TYPE_CHECKING:
    from shardwise.engine.engine import Engine


_ACT, _GRAD = 0, 1


@dataclass
class BatchStats:
    """What one ``train_batch`` / ``eval_batch`` cost this rank."""

    compute_s: float = 0.0  # forward + backward time
    forward_s: float = 0.0
    backward_s: float = 0.0
    pipeline_s: float = 0.0  # from the start to this rank's last forward/backward transfer (training)
    wall_s: float = 0.0  # whole schedule, including waits, reductions and the optimizer step
    forwards: int = 0
    backwards: int = 0


@dataclass
class BatchResult:
    """Outputs of one schedule run on this rank."""

    losses: list[Any] = field(default_factory=list)  # last stage: one (detached) loss or output per micro-batch
    last_outputs: Any = None  # last stage: outputs of the last micro-batch (``eval_batch(return_logits=True)``)
    stats: BatchStats = field(default_factory=BatchStats)


class StageExecutor:
    """Executes schedules for ``engine`` (a ``PipelineEngine``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.module = engine.module
        self.topology = engine.topology
        self.p2p = engine.p2p
        self.stages = self.topology.size("pp")
        self.stage = self.topology.coord("pp")
        self.chunks = self.module.virtual_stages

    # -- geometry -------------------------------------------------------------------------------------------------
    def _vs(self, chunk: int) -> int:
        return chunk * self.stages + self.stage

    def _is_first(self, chunk: int) -> bool:
        return self._vs(chunk) == 0

    def _is_last(self, chunk: int) -> bool:
        return self._vs(chunk) == self.stages * self.chunks - 1

    def _rank_of(self, vs: int) -> int:
        return self.topology.rank_at(pp=vs % self.stages)

    # -- running --------------------------------------------------------------------------------------------------
    def run(self, schedule: S.PipeSchedule, *, train: bool, compute_loss: bool = True,
            keep_last_outputs: bool = False) -> BatchResult:
        """Execute every instruction of ``schedule``; returns the last stage's losses/outputs and timings."""
        self._train = train
        self._compute_loss = compute_loss
        self._keep_last = keep_last_outputs
        self._inputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._outputs: dict[tuple[int, int], Any] = {}
        self._labels: dict[int, Any] = {}
        self._grads: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.result = BatchResult()
        self._start = start = time.perf_counter()
        handlers = {
            S.LoadMicroBatch: self._load, S.ForwardPass: self._forward, S.BackwardPass: self._backward,
            S.SendActivation: self._send_activation, S.RecvActivation: self._recv_activation,
            S.SendGrad: self._send_grad, S.RecvGrad: self._recv_grad,
            S.ReduceTiedGrads: lambda _: self._reduce_tied_grads(),
            S.ReduceGrads: lambda _: self._reduce_grads(),
            S.OptimizerStep: lambda _: self.engine._optimizer_step(self.result),
        }
        try:
            for instr in schedule.instructions():
                handlers[type(instr)](instr)
        finally:
            self.p2p.wait()
        self.result.stats.wall_s = time.perf_counter() - start
        for buf in (self._inputs, self._outputs, self._labels, self._grads):
            buf.clear()
        return self.result

    def _reduce_tied_grads(self) -> None:
        self.p2p.wait()
        self.result.stats.pipeline_s = time.perf_counter() - self._start
        self.engine._reduce_tied_grads()

    def _reduce_grads(self) -> None:
        self.p2p.wait()  # every gradient this rank sent has landed: its buffers may be reused
        self.engine._reduce_grads()

    # -- data -----------------------------------------------------------------------------------------------------
    def _load(self, instr: S.PipeInstruction) -> None:
        batch = self.engine._next_batch()
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"a pipeline data iterator must yield (inputs, labels) pairs, got {type(batch).__name__}"
                f"{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}; inputs go to the "
                "first stage and labels to the loss on the last stage"
            )
        device = self.engine.device
        if self.stage == 0:
            dtype = self.engine.compute_dtype  # float inputs follow the model's dtype (bf16/fp16 training)
            inputs = tuple(t.detach().to(device, dtype=dtype if t.is_floating_point() else t.dtype)
                           for t in as_tensor_tuple(batch[0], "the batch inputs"))
            if self._train and self.module.activation_checkpoint_interval > 0:
                # reentrant checkpointing only tracks a segment whose inputs require grad
                inputs = tuple(t.requires_grad_(True) if t.is_floating_point() else t for t in inputs)
            self._inputs[(0, instr.micro_batch)] = inputs
        if self.stage == self.stages - 1:
            labels = batch[1]
            if torch.is_tensor(labels):
                labels = labels.to(device)
            elif isinstance(labels, (tuple, list)):
                labels = tuple(t.to(device) if torch.is_tensor(t) else t for t in labels)
            self._labels[instr.micro_batch] = labels

    # -- compute --------------------------------------------------------------------------------------------------
    def _forward(self, instr: S.PipeInstruction) -> None:
        key = (instr.chunk, instr.micro_batch)
        inputs = self._inputs[key]
        x = inputs[0] if len(inputs) == 1 else inputs
        t0 = time.perf_counter()
        with self.engine._autocast():  # torch_autocast: the stage's forward and the loss (engine/autocast.py)
            out = self.module(x, chunk=instr.chunk)
            if self._is_last(instr.chunk):
                labels = self._labels.pop(instr.micro_batch, None)
                loss_fn = self.module.loss_fn
                loss = loss_fn(out, labels) if self._compute_loss and loss_fn is not None else out
        if self._is_last(instr.chunk):
            self._outputs[key] = loss
            self.result.losses.append(_detach(loss))
            if self._keep_last:
                self.result.last_outputs = _detach(out)
        else:
            self._outputs[key] = as_tensor_tuple(out, f"the output of stage {self.stage} (chunk {instr.chunk})")
        self._account(t0, forward=True)
        if not self._train:
            self._inputs.pop(key, None)
            if self._is_last(instr.chunk):
                self._outputs.pop(key, None)

    def _backward(self, instr: S.PipeInstruction) -> None:
        key = (instr.chunk, instr.micro_batch)
        out = self._outputs.pop(key)
        strategy = self.engine.strategy
        t0 = time.perf_counter()
        strategy.begin_backward(False)  # accumulate locally; the ReduceGrads instruction reduces once per batch
        if self._is_last(instr.chunk):
            if not (torch.is_tensor(out) and out.numel() == 1):
                raise TypeError(
                    "the last stage must produce a scalar loss to train: give PipelineModule a loss_fn(outputs, "
                    f"labels), or make the last layer return the loss (got {type(out).__name__})"
                )
            (out * self.engine._loss_multiplier()).backward()
        else:
            grads = self._grads.pop(key)
            tracked = [t for t in out if t.requires_grad and t.is_floating_point()]
            if len(tracked) != len(grads):
                raise RuntimeError(f"stage {self.stage}: {len(tracked)} outputs require grad but the next stage sent "
                                   f"{len(grads)} gradients; both stages must run the same model")
            if tracked:
                torch.autograd.backward(tracked, list(grads))
        strategy.end_backward()
        self._account(t0, forward=False)
        if self._is_first(instr.chunk):
            self._inputs.pop(key, None)

    def _account(self, t0: float, forward: bool) -> None:
        dt = time.perf_counter() - t0
        stats = self.result.stats
        stats.compute_s += dt
        if forward:
            stats.forward_s += dt
            stats.forwards += 1
        else:
            stats.backward_s += dt
            stats.backwards += 1

    # -- transfers ------------------------------------------------------------------------------------------------
    def _send_activation(self, instr: S.PipeInstruction) -> None:
        key = (instr.chunk, instr.micro_batch)
        outputs = self._outputs[key] if self._train else self._outputs.pop(key)
        dst_vs = self._vs(instr.chunk) + 1
        self.p2p.send(outputs, self._rank_of(dst_vs), tag=2 * dst_vs + _ACT)

    def _recv_activation(self, instr: S.PipeInstruction) -> None:
        vs = self._vs(instr.chunk)
        tensors = self.p2p.recv(self._rank_of(vs - 1), tag=2 * vs + _ACT, device=self.engine.device)
        if not self._train:
            tensors = tuple(t.detach() for t in tensors)
        self._inputs[(instr.chunk, instr.micro_batch)] = tensors

    def _send_grad(self, instr: S.PipeInstruction) -> None:
        inputs = self._inputs.pop((instr.chunk, instr.micro_batch))
        grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t)
                      for t in inputs if t.requires_grad and t.is_floating_point())
        dst_vs = self._vs(instr.chunk) - 1
        self.p2p.send(grads, self._rank_of(dst_vs), tag=2 * dst_vs + _GRAD, grads=True)

    def _recv_grad(self, instr: S.PipeInstruction) -> None:
        vs = self._vs(instr.chunk)
        self._grads[(instr.chunk, instr.micro_batch)] = self.p2p.recv(
            self._rank_of(vs + 1), tag=2 * vs + _GRAD, device=self.engine.device, grads=True)


def _detach(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value
