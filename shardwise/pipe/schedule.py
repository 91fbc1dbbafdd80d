"""Pipeline schedules as pure instruction streams: what one stage does, in order (no torch.distributed here).

A schedule is a list of ``PipeInstruction``s for one rank. The engine executes them one by one; the unit tests
compare them with hand-written tables; ``simulate.py`` replays all ranks' streams to prove they cannot deadlock and
to measure the bubble. Three schedules:

* ``InferenceSchedule``: forward only, micro-batches in order.
* ``TrainSchedule``: 1F1B (PipeDream-Flush). Stage ``s`` of ``p`` runs ``min(p - s - 1, m)`` warm-up forwards, then
  alternates one forward and one backward, then drains the remaining backwards. At most ``p - s`` micro-batches'
  activations are alive on a stage (GPipe keeps all ``m``); the bubble is ``(p - 1) / (m + p - 1)`` of the step.
* ``InterleavedTrainSchedule``: 1F1B over ``v`` model chunks per rank (virtual stages ``c * p + s``). Each rank
  works on a group of ``p`` micro-batches chunk by chunk, so the fill/drain ramp is ``v`` times shorter: bubble
  ``(p - 1) / (v * m + p - 1)``, paid for with ``v`` times more point-to-point messages.

Communication contract (see [Note: p2p ordering]): sends never block (the engine uses ``isend``) and a receive
comes right before the compute that needs it. On each directed link between two ranks, messages (activations and
gradients together) are received in the order they are sent, which ``simulate.run`` verifies for every schedule
(``fifo_ok``): transports that match messages in order without tags work as well as tagged ones.

[Note: p2p ordering] With non-blocking sends a rank waits only on data it needs now, so a deadlock would need a
cycle of "waits for data produced later in program order"; the schedules here are built from a valid sequential
order of the work (forward of (chunk, mb) before its successor virtual stage's forward, backward in the reverse
chain), which excludes such cycles. ``simulate.run`` replays the streams and raises if one ever appears.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "PipeInstruction", "LoadMicroBatch", "ForwardPass", "BackwardPass", "SendActivation", "RecvActivation",
    "SendGrad", "RecvGrad", "ReduceTiedGrads", "ReduceGrads", "OptimizerStep", "PipeSchedule",
    "InferenceSchedule", "TrainSchedule", "InterleavedTrainSchedule", "bubble_fraction",
]


@dataclass(frozen=True)
class PipeInstruction:
    """One step of a stage's work on micro-batch ``micro_batch`` of model chunk ``chunk`` (0 without chunks)."""

    micro_batch: int = -1
    chunk: int = 0
    code: ClassVar[str] = "?"

    @property
    def name(self) -> str:
        """The instruction's class name (DeepSpeed's ``PipeInstruction.name``)."""
        return type(self).__name__

    @property
    def buffer_id(self) -> int:
        """DeepSpeed-style buffer index: the micro-batch this instruction works on."""
        return self.micro_batch

    @property
    def kwargs(self) -> dict[str, Any]:
        """Arguments as a dict (DeepSpeed's instructions carry ``buffer_id``)."""
        return {"buffer_id": self.micro_batch} if self.micro_batch >= 0 else {}

    def __str__(self) -> str:
        if self.micro_batch < 0:
            return self.code
        return f"{self.code}{self.micro_batch}" + (f".{self.chunk}" if self.chunk else "")


class LoadMicroBatch(PipeInstruction):
    """Read the next batch from the data iterator: inputs on the first stage, labels on the last."""

    code = "L"


class ForwardPass(PipeInstruction):
    """Run this rank's layers of ``chunk`` on the micro-batch (and the loss on the last stage)."""

    code = "F"


class BackwardPass(PipeInstruction):
    """Backpropagate the micro-batch through ``chunk`` (from the loss, or from the received gradient)."""

    code = "B"


class SendActivation(PipeInstruction):
    """Send the chunk's output to the next (virtual) stage."""

    code = "SA"


class RecvActivation(PipeInstruction):
    """Receive the chunk's input from the previous (virtual) stage."""

    code = "RA"


class SendGrad(PipeInstruction):
    """Send the gradient of the chunk's input to the previous (virtual) stage."""

    code = "SG"


class RecvGrad(PipeInstruction):
    """Receive the gradient of the chunk's output from the next (virtual) stage."""

    code = "RG"


class ReduceTiedGrads(PipeInstruction):
    """Sum the gradients of tied weights over the stages that hold them."""

    code = "TIE"


class ReduceGrads(PipeInstruction):
    """Reduce gradients over the data-parallel (ZeRO) group."""

    code = "RED"


class OptimizerStep(PipeInstruction):
    """Clip by the global norm, update, step the LR schedule."""

    code = "STEP"


class PipeSchedule(abc.ABC):
    """The instruction stream of stage ``stage_id`` of ``stages`` for ``micro_batches`` micro-batches.

    Iterating yields one-instruction lists (DeepSpeed's schedules yield a list per step); ``instructions()`` is the
    flat list; ``str(schedule)`` is the compact form the tests compare against (``"L0 F0 SA0 ..."``).
    """

    def __init__(self, micro_batches: int, stages: int, stage_id: int, chunks: int = 1) -> None:
        if micro_batches < 1:
            raise ValueError(f"a pipeline schedule needs at least one micro-batch, got {micro_batches}")
        if stages < 1 or not 0 <= stage_id < stages:
            raise ValueError(f"stage_id {stage_id} is not a stage of a {stages}-stage pipeline")
        if chunks < 1:
            raise ValueError(f"chunks (model chunks per rank) must be >= 1, got {chunks}")
        self.micro_batches = micro_batches
        self.stages = stages
        self.stage_id = stage_id
        self.chunks = chunks
        self._instructions = self._build()

    # -- geometry shared by every schedule --------------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        """This rank holds virtual stage 0 (reads the inputs)."""
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank holds the last virtual stage (computes the loss)."""
        return self.stage_id == self.stages - 1

    def virtual_stage(self, chunk: int) -> int:
        """Global index of this rank's ``chunk`` among the ``stages * chunks`` virtual stages."""
        return chunk * self.stages + self.stage_id

    def _first(self, chunk: int) -> bool:
        return self.virtual_stage(chunk) == 0

    def _last(self, chunk: int) -> bool:
        return self.virtual_stage(chunk) == self.stages * self.chunks - 1

    def _forward(self, mb: int, chunk: int = 0) -> list[PipeInstruction]:
        out: list[PipeInstruction] = []
        if chunk == 0 and (self.is_first_stage or self.is_last_stage):
            out.append(LoadMicroBatch(mb))
        if not self._first(chunk):
            out.append(RecvActivation(mb, chunk))
        out.append(ForwardPass(mb, chunk))
        if not self._last(chunk):
            out.append(SendActivation(mb, chunk))
        return out

    def _backward(self, mb: int, chunk: int = 0) -> list[PipeInstruction]:
        out: list[PipeInstruction] = []
        if not self._last(chunk):
            out.append(RecvGrad(mb, chunk))
        out.append(BackwardPass(mb, chunk))
        if not self._first(chunk):
            out.append(SendGrad(mb, chunk))
        return out

    @abc.abstractmethod
    def _build(self) -> list[PipeInstruction]:
        """The whole instruction stream of this stage (each schedule's own)."""

    # -- views ---------------------------------------------------------------------------------------------------------
    def instructions(self) -> list[PipeInstruction]:
        """The flat instruction list."""
        return list(self._instructions)

    def steps(self) -> Iterator[list[PipeInstruction]]:
        """DeepSpeed-style iteration: one list of instructions per step."""
        for instr in self._instructions:
            yield [instr]

    def __iter__(self) -> Iterator[list[PipeInstruction]]:
        return self.steps()

    def num_pipe_buffers(self) -> int:
        """Largest number of micro-batches whose activations are alive at once on this rank."""
        alive = peak = 0
        for instr in self._instructions:
            if isinstance(instr, ForwardPass):
                alive += 1
                peak = max(peak, alive)
            elif isinstance(instr, BackwardPass):
                alive -= 1
        return max(peak, 1)

    def __str__(self) -> str:
        return " ".join(str(i) for i in self._instructions)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(micro_batches={self.micro_batches}, stages={self.stages}, "
                f"stage_id={self.stage_id}, chunks={self.chunks})")


class InferenceSchedule(PipeSchedule):
    """Forward passes only, in micro-batch order (``eval_batch``); with chunks, the interleaved forward order."""

    def num_pipe_buffers(self) -> int:
        """One: without backward, a micro-batch's activations are dropped as soon as they are sent."""
        return 1

    def _build(self) -> list[PipeInstruction]:
        out: list[PipeInstruction] = []
        for chunk, mb in _forward_order(self.micro_batches, self.stages, self.chunks):
            out.extend(self._forward(mb, chunk))
        return out


class TrainSchedule(PipeSchedule):
    """1F1B: warm-up forwards, one-forward-one-backward, drain; then tied-gradient and data-parallel reduction and
    the optimizer step."""

    def __init__(self, micro_batches: int, stages: int, stage_id: int) -> None:
        super().__init__(micro_batches, stages, stage_id, chunks=1)

    def _build(self) -> list[PipeInstruction]:
        m, p, s = self.micro_batches, self.stages, self.stage_id
        warmup = min(p - s - 1, m)
        out: list[PipeInstruction] = []
        for mb in range(warmup):
            out.extend(self._forward(mb))
        for i in range(m - warmup):
            out.extend(self._forward(warmup + i))
            out.extend(self._backward(i))
        for mb in range(m - warmup, m):
            out.extend(self._backward(mb))
        return out + [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]


class InterleavedTrainSchedule(PipeSchedule):
    """1F1B over ``chunks`` model chunks per rank (Narayanan et al., 2021, "interleaved 1F1B").

    Forward order: micro-batches in groups of ``stages``; each group goes through chunk 0, then chunk 1, ...
    Backward order: the same groups, chunks in reverse. Stage ``s`` warms up with
    ``2 (p - s - 1) + (v - 1) p`` forwards (capped at ``m v``) so that the first backward's gradient has arrived.
    The number of micro-batches must be a multiple of the number of stages (as in Megatron-LM): with a last,
    smaller group the ramp no longer hides the wrap-around transfers and the replay (``simulate.run``) shows
    deadlocks for some shapes.
    """

    def _build(self) -> list[PipeInstruction]:
        m, p, s, v = self.micro_batches, self.stages, self.stage_id, self.chunks
        if v > 1 and m % p:
            raise ValueError(
                f"the interleaved 1F1B schedule needs the number of micro-batches (gradient_accumulation_steps = "
                f"{m}) to be a multiple of the number of pipeline stages ({p}); use {p * max(1, m // p)} or "
                f"{p * (m // p + 1)}, or virtual_stages=1 for plain 1F1B"
            )
        fwd = _forward_order(m, p, v)
        bwd = _backward_order(m, p, v)
        total = len(fwd)
        warmup = min(2 * (p - s - 1) + (v - 1) * p, total)
        out: list[PipeInstruction] = []
        for chunk, mb in fwd[:warmup]:
            out.extend(self._forward(mb, chunk))
        for i in range(total - warmup):
            out.extend(self._forward(fwd[warmup + i][1], fwd[warmup + i][0]))
            out.extend(self._backward(bwd[i][1], bwd[i][0]))
        for chunk, mb in bwd[total - warmup:]:
            out.extend(self._backward(mb, chunk))
        return out + [ReduceTiedGrads(), ReduceGrads(), OptimizerStep()]


def _groups(m: int, p: int) -> list[range]:
    return [range(g, min(g + p, m)) for g in range(0, m, p)]


def _forward_order(m: int, p: int, v: int) -> list[tuple[int, int]]:
    """(chunk, micro-batch) in the order a rank runs forwards: per group of ``p`` micro-batches, chunk by chunk."""
    return [(c, mb) for group in _groups(m, p) for c in range(v) for mb in group]


def _backward_order(m: int, p: int, v: int) -> list[tuple[int, int]]:
    """(chunk, micro-batch) in the order a rank runs backwards: per group, last chunk first."""
    return [(c, mb) for group in _groups(m, p) for c in reversed(range(v)) for mb in group]


def make_train_schedule(micro_batches: int, stages: int, stage_id: int, chunks: int = 1) -> PipeSchedule:
    """1F1B for one chunk per rank, interleaved 1F1B for more."""
    if chunks == 1:
        return TrainSchedule(micro_batches, stages, stage_id)
    return InterleavedTrainSchedule(micro_batches, stages, stage_id, chunks)


def bubble_fraction(stages: int, micro_batches: int, chunks: int = 1) -> float:
    """Theoretical idle fraction of a 1F1B step: ``(p - 1) / (v m + p - 1)`` (``v = 1``: plain 1F1B).

    Each stage is busy ``m (f + b)`` and idle ``(p - 1)(f + b) / v`` during fill and drain.
    """
    p, m, v = stages, micro_batches, chunks
    return (p - 1) / (v * m + p - 1)
