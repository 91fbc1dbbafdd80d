"""Pipeline schedules against hand-written instruction tables, and replays proving they finish with the
theoretical bubble (pure Python: no torch.distributed)."""

from __future__ import annotations

import pytest

from shardwise.pipe import schedule as S
from shardwise.pipe import simulate

# Notation: L=load, F=forward, B=backward, SA/RA=send/recv activation, SG/RG=send/recv gradient; "3.1" is
# micro-batch 3 of model chunk 1. Tables written from the 1F1B definition: stage s warms up with p - s - 1
# forwards, alternates forward/backward, then drains.
TRAIN_2_STAGES_4_MB = [
    "L0 F0 SA0 L1 F1 SA1 RG0 B0 L2 F2 SA2 RG1 B1 L3 F3 SA3 RG2 B2 RG3 B3 TIE RED STEP",
    "L0 RA0 F0 B0 SG0 L1 RA1 F1 B1 SG1 L2 RA2 F2 B2 SG2 L3 RA3 F3 B3 SG3 TIE RED STEP",
]
TRAIN_4_STAGES_6_MB = [
    "L0 F0 SA0 L1 F1 SA1 L2 F2 SA2 "
    "L3 F3 SA3 RG0 B0 L4 F4 SA4 RG1 B1 L5 F5 SA5 RG2 B2 "
    "RG3 B3 RG4 B4 RG5 B5 TIE RED STEP",
    "RA0 F0 SA0 RA1 F1 SA1 "
    "RA2 F2 SA2 RG0 B0 SG0 RA3 F3 SA3 RG1 B1 SG1 RA4 F4 SA4 RG2 B2 SG2 RA5 F5 SA5 RG3 B3 SG3 "
    "RG4 B4 SG4 RG5 B5 SG5 TIE RED STEP",
    "RA0 F0 SA0 "
    "RA1 F1 SA1 RG0 B0 SG0 RA2 F2 SA2 RG1 B1 SG1 RA3 F3 SA3 RG2 B2 SG2 RA4 F4 SA4 RG3 B3 SG3 "
    "RA5 F5 SA5 RG4 B4 SG4 RG5 B5 SG5 TIE RED STEP",
    "L0 RA0 F0 B0 SG0 L1 RA1 F1 B1 SG1 L2 RA2 F2 B2 SG2 L3 RA3 F3 B3 SG3 L4 RA4 F4 B4 SG4 L5 RA5 F5 B5 SG5 "
    "TIE RED STEP",
]
# Interleaved, 2 chunks: virtual stage of chunk c on rank s is 2c + s (p = 2) or 4c + s (p = 4). Forward order:
# micro-batches in groups of p, chunk 0 then chunk 1; backward: chunk 1 then chunk 0. Rank s warms up with
# 2 (p - s - 1) + (v - 1) p forwards (capped at m v).
INTERLEAVED_2_STAGES_4_MB = [
    "L0 F0 SA0 L1 F1 SA1 RA0.1 F0.1 SA0.1 RA1.1 F1.1 SA1.1 "
    "L2 F2 SA2 RG0.1 B0.1 SG0.1 L3 F3 SA3 RG1.1 B1.1 SG1.1 RA2.1 F2.1 SA2.1 RG0 B0 RA3.1 F3.1 SA3.1 RG1 B1 "
    "RG2.1 B2.1 SG2.1 RG3.1 B3.1 SG3.1 RG2 B2 RG3 B3 TIE RED STEP",
    "L0 RA0 F0 SA0 L1 RA1 F1 SA1 "
    "RA0.1 F0.1 B0.1 SG0.1 RA1.1 F1.1 B1.1 SG1.1 L2 RA2 F2 SA2 RG0 B0 SG0 L3 RA3 F3 SA3 RG1 B1 SG1 "
    "RA2.1 F2.1 B2.1 SG2.1 RA3.1 F3.1 B3.1 SG3.1 "
    "RG2 B2 SG2 RG3 B3 SG3 TIE RED STEP",
]
INTERLEAVED_4_STAGES_4_MB_FIRST_LAST = [
    # stage 0: warm-up 2*3 + 4 = 10 > 8, so every forward comes first
    "L0 F0 SA0 L1 F1 SA1 L2 F2 SA2 L3 F3 SA3 RA0.1 F0.1 SA0.1 RA1.1 F1.1 SA1.1 RA2.1 F2.1 SA2.1 RA3.1 F3.1 SA3.1 "
    "RG0.1 B0.1 SG0.1 RG1.1 B1.1 SG1.1 RG2.1 B2.1 SG2.1 RG3.1 B3.1 SG3.1 RG0 B0 RG1 B1 RG2 B2 RG3 B3 TIE RED STEP",
    # stage 3: warm-up 4 (chunk 0), then chunk 1 (the last virtual stage) alternates F/B, then chunk 0 drains
    "L0 RA0 F0 SA0 L1 RA1 F1 SA1 L2 RA2 F2 SA2 L3 RA3 F3 SA3 "
    "RA0.1 F0.1 B0.1 SG0.1 RA1.1 F1.1 B1.1 SG1.1 RA2.1 F2.1 B2.1 SG2.1 RA3.1 F3.1 B3.1 SG3.1 "
    "RG0 B0 SG0 RG1 B1 SG1 RG2 B2 SG2 RG3 B3 SG3 TIE RED STEP",
]


@pytest.mark.parametrize("stage", range(2))
def test_1f1b_two_stages(stage: int) -> None:
    assert str(S.TrainSchedule(4, 2, stage)) == TRAIN_2_STAGES_4_MB[stage]


@pytest.mark.parametrize("stage", range(4))
def test_1f1b_four_stages(stage: int) -> None:
    assert str(S.TrainSchedule(6, 4, stage)) == TRAIN_4_STAGES_6_MB[stage]


@pytest.mark.parametrize("stage", range(2))
def test_interleaved_two_stages(stage: int) -> None:
    assert str(S.InterleavedTrainSchedule(4, 2, stage, chunks=2)) == INTERLEAVED_2_STAGES_4_MB[stage]


@pytest.mark.parametrize(("stage", "table"), [(0, 0), (3, 1)])
def test_interleaved_four_stages(stage: int, table: int) -> None:
    assert str(S.InterleavedTrainSchedule(4, 4, stage, chunks=2)) == INTERLEAVED_4_STAGES_4_MB_FIRST_LAST[table]


def test_inference_schedules() -> None:
    assert str(S.InferenceSchedule(3, 2, 0)) == "L0 F0 SA0 L1 F1 SA1 L2 F2 SA2"
    assert str(S.InferenceSchedule(3, 2, 1)) == "L0 RA0 F0 L1 RA1 F1 L2 RA2 F2"
    assert str(S.InferenceSchedule(2, 4, 2)) == "RA0 F0 SA0 RA1 F1 SA1"
    assert str(S.InferenceSchedule(2, 1, 0)) == "L0 F0 L1 F1"
    assert str(S.InferenceSchedule(2, 2, 1, chunks=2)) == "L0 RA0 F0 SA0 L1 RA1 F1 SA1 RA0.1 F0.1 RA1.1 F1.1"


def test_single_stage_is_plain_accumulation() -> None:
    assert str(S.TrainSchedule(3, 1, 0)) == "L0 F0 B0 L1 F1 B1 L2 F2 B2 TIE RED STEP"


def test_deepspeed_style_iteration_and_buffers() -> None:
    sched = S.TrainSchedule(6, 4, 0)
    steps = list(sched)
    assert all(len(step) == 1 for step in steps) and steps[1][0].name == "ForwardPass"
    assert steps[1][0].kwargs == {"buffer_id": 0} and steps[-1][0].kwargs == {}
    assert [S.TrainSchedule(6, 4, s).num_pipe_buffers() for s in range(4)] == [4, 3, 2, 1]
    assert S.TrainSchedule(2, 4, 0).num_pipe_buffers() == 2  # never more than the micro-batches
    assert S.InferenceSchedule(5, 2, 0).num_pipe_buffers() == 1


def test_invalid_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of the number of pipeline stages"):
        S.InterleavedTrainSchedule(5, 4, 0, chunks=2)
    with pytest.raises(ValueError, match="stage_id 2 is not a stage"):
        S.TrainSchedule(4, 2, 2)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        S.TrainSchedule(0, 2, 0)


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_replay_finishes_in_order_with_the_theoretical_bubble(stages: int, chunks: int) -> None:
    for m in range(1, 13):
        inference = simulate.run([S.InferenceSchedule(m, stages, s, chunks) for s in range(stages)])
        assert inference.fifo_ok
        if chunks > 1 and m % stages:
            continue
        scheds = [S.make_train_schedule(m, stages, s, chunks) for s in range(stages)]
        for fwd, bwd in ((1.0, 2.0), (1.0, 1.0)):
            result = simulate.run(scheds, fwd=fwd, bwd=bwd)
            assert result.fifo_ok, (stages, chunks, m)
            assert result.bubble == pytest.approx(S.bubble_fraction(stages, m, chunks), abs=1e-12), (stages, chunks, m)
            assert result.busy == [m * chunks * (fwd + bwd)] * stages


def test_interleaving_shrinks_the_bubble() -> None:
    plain = simulate.run([S.make_train_schedule(8, 4, s) for s in range(4)]).bubble
    inter = simulate.run([S.make_train_schedule(8, 4, s, 2) for s in range(4)]).bubble
    assert plain == pytest.approx(3 / 11) and inter == pytest.approx(3 / 19)


def test_replay_detects_a_deadlock() -> None:
    class Broken(S.PipeSchedule):
        def _build(self) -> list[S.PipeInstruction]:  # both stages receive before anyone sends
            return [S.RecvGrad(0), S.BackwardPass(0)] if self.stage_id == 0 else [S.RecvActivation(0)]

    with pytest.raises(simulate.ScheduleDeadlock, match="no rank can progress"):
        simulate.run([Broken(1, 2, 0), Broken(1, 2, 1)])


def test_replay_detects_out_of_order_delivery() -> None:
    class Swapped(S.PipeSchedule):
        def _build(self) -> list[S.PipeInstruction]:  # rank 0 sends micro-batch 1 first; rank 1 expects 0 first
            if self.stage_id == 0:
                return [S.ForwardPass(0), S.ForwardPass(1), S.SendActivation(1), S.SendActivation(0)]
            return [S.RecvActivation(0), S.ForwardPass(0), S.RecvActivation(1), S.ForwardPass(1)]

    assert not simulate.run([Swapped(2, 2, 0), Swapped(2, 2, 1)]).fifo_ok
    assert simulate.run([S.InferenceSchedule(2, 2, s) for s in range(2)]).fifo_ok
