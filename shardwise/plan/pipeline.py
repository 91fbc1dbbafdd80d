"""The pipeline schedule's cost, from the real schedule generators: bubble fraction and micro-batches in flight.

``schedule.make_train_schedule`` builds every stage's instruction stream exactly as the pipeline engine runs it;
``simulate.run`` replays all of them on a model clock (forward 1, backward 2, or 3 when backward recomputes the
forward under activation checkpointing) and reports the idle fraction, which for 1F1B equals the closed form
``(p - 1) / (v m + p - 1)``. The in-flight count (``num_pipe_buffers``) says how many micro-batches' activations
a stage holds at its peak: ``min(p - s, m)`` for 1F1B.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from shardwise.pipe import schedule as S
from shardwise.pipe.simulate import run


@dataclass(frozen=True)
class PipelineCost:
    """Schedule facts for one plan."""

    stages: int
    micro_batches: int
    chunks: int
    bubble: float  # replayed idle fraction of the step, mean over stages
    bubble_closed_form: float
    in_flight: list[int]  # per stage: peak micro-batch (chunk) activations alive

    def as_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def pipeline_cost(stages: int, micro_batches: int, chunks: int = 1, recompute: bool = False) -> PipelineCost:
    """Bubble and in-flight counts of the training schedule for this shape (``stages == 1``: no pipeline)."""
    schedules = [S.make_train_schedule(micro_batches, stages, s, chunks) for s in range(stages)]
    bubble = run(schedules, fwd=1.0, bwd=3.0 if recompute else 2.0).bubble if stages > 1 else 0.0
    return PipelineCost(stages, micro_batches, chunks, bubble, S.bubble_fraction(stages, micro_batches, chunks),
                        [s.num_pipe_buffers() for s in schedules])
