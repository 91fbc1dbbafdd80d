"""DeepSpeed LR schedules: values checked against hand-computed numbers, state round trips, errors."""

from __future__ import annotations

import logging

import pytest
import torch

from shardwise.engine.lr_schedules import (
    LRRangeTest,
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    build_scheduler,
)


def _opt(lr: float = 0.1, groups: int = 1, cls=torch.optim.AdamW) -> torch.optim.Optimizer:
    return cls([{"params": [torch.zeros(2, requires_grad=True)]} for _ in range(groups)], lr=lr)


def _lrs_at(sched, iterations: list[int]) -> list[float]:
    """lr after stepping to each iteration in turn (step() called once per iteration, as the engine does)."""
    out = []
    for t in range(max(iterations) + 1):
        sched.step()
        assert sched.last_batch_iteration == t
        if t in iterations:
            out.append(sched.optimizer.param_groups[0]["lr"])
    return out


def test_warmup_lr_log():
    opt = _opt()
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=0.01, warmup_num_steps=10)
    assert opt.param_groups[0]["lr"] == 0.0 and sched.get_last_lr() == [0.0]  # constructor: step-0 lr
    lrs = _lrs_at(sched, [0, 1, 4, 9, 10, 100])
    assert lrs == pytest.approx([0.0, 0.0030102999566398118, 0.006989700043360187, 0.01, 0.01, 0.01], rel=1e-12)


def test_warmup_lr_linear_min_and_default_max():
    sched = WarmupLR(_opt(lr=0.01), warmup_min_lr=0.001, warmup_num_steps=10, warmup_type="linear")
    assert sched.max_lrs == [0.01]  # warmup_max_lr=None takes the optimizer's lr
    assert _lrs_at(sched, [0, 1, 5, 10, 11]) == pytest.approx([0.001, 0.0019, 0.0055, 0.01, 0.01], rel=1e-12)


def test_warmup_lr_edge_cases(caplog):
    sched = WarmupLR(_opt(), warmup_max_lr=0.01, warmup_num_steps=1)  # forced to 2 steps
    assert sched.warmup_num_steps == 2 and _lrs_at(sched, [0, 1]) == pytest.approx([0.0, 0.01])
    with caplog.at_level(logging.WARNING):
        sched = WarmupLR(_opt(), warmup_max_lr=0.01, warmup_num_steps=10, warmup_type="Linear")
    assert sched.warmup_type == "log" and "unknown warmup_type" in caplog.text
    per_group = WarmupLR(_opt(groups=2), warmup_min_lr=[0.0, 0.1], warmup_max_lr=[1.0, 0.2], warmup_num_steps=4,
                         warmup_type="linear")
    per_group.step(2)
    assert per_group.get_last_lr() == pytest.approx([0.5, 0.15])
    with pytest.raises(ValueError, match="warmup_min_lr has 3 values but the optimizer has 2 param groups"):
        WarmupLR(_opt(groups=2), warmup_min_lr=[0.0, 0.1, 0.2])
    for bad in (0, -5, 10.0):
        with pytest.raises(ValueError, match="warmup_num_steps must be a positive integer"):
            WarmupLR(_opt(), warmup_num_steps=bad)


def test_warmup_decay_lr():
    sched = WarmupDecayLR(_opt(), total_num_steps=20, warmup_max_lr=0.01, warmup_num_steps=10,
                          warmup_type="linear")
    assert _lrs_at(sched, [5, 9, 10, 15, 19, 20, 25]) == pytest.approx(
        [0.005, 0.009, 0.01, 0.005, 0.001, 0.0, 0.0], abs=1e-15)


def test_warmup_decay_lr_default_max_and_log():
    sched = WarmupDecayLR(_opt(lr=0.5), total_num_steps=100, warmup_num_steps=10)
    assert sched.max_lrs == [0.001]  # DeepSpeed's default here is 0.001, not the optimizer's lr
    assert _lrs_at(sched, [1, 10, 55]) == pytest.approx([0.0003010299956639812, 0.001, 0.0005], rel=1e-12)


def test_warmup_cosine_lr():
    opt = _opt(lr=0.1)
    sched = WarmupCosineLR(opt, total_num_steps=20, warmup_min_ratio=0.1, warmup_num_steps=10, cos_min_ratio=0.01,
                           warmup_type="linear")
    assert opt.param_groups[0]["lr"] == 0.0  # DeepSpeed applies ratio 0 before the first step()
    lrs = _lrs_at(sched, [0, 5, 9, 10, 14, 19, 30])
    assert lrs == pytest.approx([0.01, 0.055, 0.091, 0.09757729755661011, 0.0505, 0.001, 0.001], rel=1e-12)


def test_warmup_cosine_lr_log_and_degenerate_total():
    sched = WarmupCosineLR(_opt(lr=0.1), total_num_steps=10, warmup_min_ratio=0.1, warmup_num_steps=10)
    assert _lrs_at(sched, [3, 10, 11]) == pytest.approx([0.0641853992195166, 1e-5, 1e-5], rel=1e-12)


def test_lr_range_test():
    opt = _opt()
    sched = LRRangeTest(opt, lr_range_test_min_lr=0.01, lr_range_test_step_size=10, lr_range_test_step_rate=2.0)
    assert opt.param_groups[0]["lr"] == 0.01
    assert _lrs_at(sched, [0, 9, 18]) == pytest.approx([0.012, 0.03, 0.048])
    stairs = LRRangeTest(_opt(), lr_range_test_min_lr=0.01, lr_range_test_step_size=10, lr_range_test_step_rate=2.0,
                         lr_range_test_staircase=True)
    assert _lrs_at(stairs, [0, 8, 9, 18, 19]) == pytest.approx([0.01, 0.01, 0.03, 0.03, 0.05])


def test_one_cycle_lr_momentum_and_decay():
    opt = _opt()
    sched = OneCycle(opt, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=4, decay_step_size=2,
                     decay_lr_rate=0.5, cycle_min_mom=0.8, cycle_max_mom=0.9)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["betas"] == (0.8, 0.99)
    expected = {0: (0.325, 0.875), 3: (1.0, 0.8), 5: (0.55, 0.85), 7: (0.1, 0.9), 8: (0.08, 0.9), 11: (0.05, 0.9)}
    for t in range(12):
        sched.step()
        if t in expected:
            lr, mom = expected[t]
            assert opt.param_groups[0]["lr"] == pytest.approx(lr), t
            assert opt.param_groups[0]["betas"] == pytest.approx((mom, 0.99)), t


def test_one_cycle_stairs_and_no_betas(caplog):
    sched = OneCycle(_opt(), cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=4, cycle_first_stair_count=2)
    assert _lrs_at(sched, [0, 1, 3, 4, 7, 8]) == pytest.approx([0.1, 0.55, 1.0, 0.55, 0.1, 0.1])
    sgd = _opt(cls=torch.optim.SGD)
    with caplog.at_level(logging.WARNING):
        sched = OneCycle(sgd, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=4)
    assert not sched.cycle_momentum and "betas" not in sgd.param_groups[0] and "cycle_momentum disabled" in caplog.text
    sched.step()
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.325)


@pytest.mark.parametrize("factory", [
    lambda o: WarmupLR(o, warmup_max_lr=0.01, warmup_num_steps=10),
    lambda o: WarmupDecayLR(o, total_num_steps=30, warmup_num_steps=10, warmup_type="linear"),
    lambda o: WarmupCosineLR(o, total_num_steps=30, warmup_num_steps=10),
    lambda o: OneCycle(o, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=5),
    lambda o: LRRangeTest(o, lr_range_test_step_size=3),
])
def test_state_dict_round_trip(factory):
    opt = _opt()
    sched = factory(opt)
    for _ in range(12):
        sched.step()
    saved = sched.state_dict()
    assert saved == {"last_batch_iteration": 11}
    sched.step()
    expected = opt.param_groups[0]["lr"]
    opt2 = _opt()
    resumed = factory(opt2)
    resumed.load_state_dict(saved)
    resumed.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert resumed.get_last_lr() == pytest.approx([expected], rel=1e-12)


def test_resumed_schedule_needs_step_before_get_last_lr_and_tensor_lr_is_filled_in_place():
    sched = OneCycle(_opt(), cycle_min_lr=0.01, cycle_max_lr=0.1, last_batch_iteration=5)
    with pytest.raises(RuntimeError, match="call step"):
        sched.get_last_lr()
    lr = torch.tensor(0.5)
    opt = torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=lr)
    WarmupLR(opt, warmup_min_lr=0.25, warmup_max_lr=1.0, warmup_num_steps=4).step()
    assert opt.param_groups[0]["lr"] is lr and lr.dim() == 0 and lr.item() == 0.25


def test_build_scheduler():
    opt = _opt()
    sched = build_scheduler("WarmupLR", {"warmup_min_lr": 0, "warmup_max_lr": 0.01, "warmup_num_steps": 10}, opt)
    assert type(sched) is WarmupLR
    assert type(build_scheduler("warmupcosinelr", {"total_num_steps": 5, "warmup_num_steps": 2}, _opt())) is \
        WarmupCosineLR
    torch_sched = build_scheduler("StepLR", {"step_size": 2}, _opt())  # torch.optim.lr_scheduler fallback
    assert type(torch_sched) is torch.optim.lr_scheduler.StepLR


def test_build_scheduler_errors():
    with pytest.raises(ValueError, match="unknown scheduler type 'WarmupLRR'.*Did you mean 'WarmupLR'"):
        build_scheduler("WarmupLRR", {}, _opt())
    with pytest.raises(ValueError, match="unknown parameter 'warmup_max'.*accepted parameters: warmup_min_lr.*"
                                         "Did you mean 'warmup_max_lr'"):
        build_scheduler("WarmupLR", {"warmup_max": 0.1}, _opt())
    with pytest.raises(ValueError, match="needs parameter\\(s\\) cycle_min_lr, cycle_max_lr"):
        build_scheduler("OneCycle", {}, _opt())
    with pytest.raises(ValueError, match="needs parameter\\(s\\) total_num_steps"):
        build_scheduler("WarmupDecayLR", {"warmup_num_steps": 10}, _opt())
