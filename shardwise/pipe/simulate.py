"""Replay every rank's instruction stream on a model clock: deadlock check, FIFO check, and the ideal bubble.

Pure Python (no torch). Sends are non-blocking and instantaneous (plus ``latency``); a receive waits for its
message; a forward costs ``fwd`` and a backward ``bwd`` time units; reductions and the optimizer step cost nothing.
The unit tests use it to prove each schedule terminates for many (stages, chunks, micro-batches), that messages on
every directed link, activations and gradients together, are received in the order they are sent (so transports
that match in order and ignore tags, like NCCL's, work too), and that the 1F1B / interleaved bubbles equal the
closed forms in ``schedule.bubble_fraction``; the benchmark compares the measured bubble with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardwise.pipe.schedule import (
    BackwardPass,
    ForwardPass,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    SendActivation,
    SendGrad,
)


class ScheduleDeadlock(RuntimeError):
    """The instruction streams cannot all complete: some receive waits for a message never sent."""


@dataclass
class SimResult:
    """Outcome of a replay."""

    finish: list[float]  # clock of each rank when its stream ends
    busy: list[float]  # compute time of each rank
    fifo_ok: bool  # on every directed link, messages (of both kinds) are received in the order they are sent
    trace: list[list[tuple[float, float, str]]] = field(default_factory=list)  # per rank: (start, end, instruction)

    @property
    def makespan(self) -> float:
        """Time until the last rank finishes."""
        return max(self.finish)

    @property
    def bubble(self) -> float:
        """Mean idle fraction of the step over ranks."""
        span = self.makespan
        return sum(1.0 - b / span for b in self.busy) / len(self.busy) if span > 0 else 0.0


def _message(instr: PipeInstruction, rank: int, stages: int) -> tuple[str, int, int, int, int]:
    """(kind, src rank, dst rank, receiving virtual stage, micro-batch) of a send or receive."""
    vs = instr.chunk * stages + rank
    if isinstance(instr, SendActivation):
        return "act", rank, (vs + 1) % stages, vs + 1, instr.micro_batch
    if isinstance(instr, RecvActivation):
        return "act", (vs - 1) % stages, rank, vs, instr.micro_batch
    if isinstance(instr, SendGrad):
        return "grad", rank, (vs - 1) % stages, vs - 1, instr.micro_batch
    return "grad", (vs + 1) % stages, rank, vs, instr.micro_batch


def run(schedules: list[PipeSchedule], fwd: float = 1.0, bwd: float = 2.0, latency: float = 0.0) -> SimResult:
    """Replay ``schedules`` (one per rank, in rank order); raise ``ScheduleDeadlock`` if they cannot finish."""
    p = len(schedules)
    streams = [s.instructions() for s in schedules]
    clock = [0.0] * p
    busy = [0.0] * p
    pos = [0] * p
    sent: dict[tuple, float] = {}
    order_sent: dict[tuple, list] = {}
    order_recv: dict[tuple, list] = {}
    done_fwd: set[tuple[int, int, int]] = set()
    trace: list[list[tuple[float, float, str]]] = [[] for _ in range(p)]
    while any(pos[r] < len(streams[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while pos[r] < len(streams[r]):
                instr = streams[r][pos[r]]
                if isinstance(instr, (RecvActivation, RecvGrad)):
                    key = _message(instr, r, p)
                    if key not in sent:
                        break
                    clock[r] = max(clock[r], sent[key])
                    order_recv.setdefault(key[1:3], []).append((key[0], *key[3:]))
                elif isinstance(instr, (SendActivation, SendGrad)):
                    key = _message(instr, r, p)
                    sent[key] = clock[r] + latency
                    order_sent.setdefault(key[1:3], []).append((key[0], *key[3:]))
                elif isinstance(instr, (ForwardPass, BackwardPass)):
                    cost = fwd if isinstance(instr, ForwardPass) else bwd
                    ident = (r, instr.chunk, instr.micro_batch)
                    if isinstance(instr, BackwardPass) and ident not in done_fwd:
                        raise ScheduleDeadlock(f"rank {r}: {instr} runs before its forward")
                    done_fwd.add(ident)
                    trace[r].append((clock[r], clock[r] + cost, str(instr)))
                    clock[r] += cost
                    busy[r] += cost
                pos[r] += 1
                progressed = True
        if not progressed:
            blocked = {r: str(streams[r][pos[r]]) for r in range(p) if pos[r] < len(streams[r])}
            raise ScheduleDeadlock(f"no rank can progress; blocked receives by rank: {blocked}")
    fifo_ok = all(order_recv.get(k) == v for k, v in order_sent.items()) and set(order_recv) <= set(order_sent)
    return SimResult(finish=clock, busy=busy, fifo_ok=fifo_ok, trace=trace)
