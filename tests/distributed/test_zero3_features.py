"""ZeRO-3 on the awkward cases: shared and external parameters, a module called twice, frozen parameters, forward
branches that change between steps, persistence, prefetch limits, host offload, and the ZeRO++ variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardwise
from shardwise import comm
from shardwise.comm import COMMS_LOG
from shardwise.zero import GatheredParameters, register_external_parameter
from tests.dist import run_ranks
from tests.models import assert_close_rel

STEPS = 4
VOCAB, WIDTH = 16, 8


class Tricky(nn.Module):
    """Every ZeRO-3 hazard in one small model."""

    def __init__(self, explicit_external: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.shared = nn.Linear(WIDTH, WIDTH)  # called twice per forward
        self.frozen = nn.Linear(WIDTH, WIDTH)  # no gradients
        self.frozen.requires_grad_(False)
        self.branch_a = nn.Linear(WIDTH, WIDTH)  # only one branch runs per step
        self.branch_b = nn.Linear(WIDTH, WIDTH)
        self.head_bias = nn.Parameter(torch.zeros(VOCAB))  # owned by the root module
        if explicit_external:
            register_external_parameter(self, self.embed.weight)

    def forward(self, idx: torch.Tensor, use_a: bool) -> torch.Tensor:
        h = self.embed(idx).mean(dim=1)
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        h = h + self.frozen(h)
        h = self.branch_a(h) if use_a else self.branch_b(h)
        return h @ self.embed.weight.t() + self.head_bias  # the embedding used outside its module (tied head)


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(77 + 1000 * step + rank)
    return torch.randint(0, VOCAB, (4, 5), generator=g), torch.randint(0, VOCAB, (4,), generator=g)


def _model(explicit: bool = False) -> Tricky:
    torch.manual_seed(0)
    return Tricky(explicit)


def _reference(dp: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _model().double()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    losses = []
    for step in range(STEPS):
        xs, ys = zip(*[_batch(step, r) for r in range(dp)])
        loss = F.cross_entropy(model(torch.cat(xs), step % 2 == 0), torch.cat(ys))
        loss.backward()
        # Like DDP and DeepSpeed, the engine gives an unused parameter a zero gradient (it is in a reduced
        # bucket), so AdamW still decays it and advances its moments; plain PyTorch does the same when the
        # gradient is a zero tensor rather than None.
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(zero: dict, explicit: bool = False, **cfg_extra) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.1,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "zero_optimization": {"stage": 3, "stage3_module_granularity_threshold": 0, **zero}, **cfg_extra}
    model = _model(explicit)
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    rank = engine.topology.coord("dp")
    losses = []
    COMMS_LOG.reset()
    for step in range(STEPS):
        x, y = _batch(step, rank)
        loss = F.cross_entropy(engine(x, step % 2 == 0), y)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        comm.all_reduce(total)
        losses.append(total.item() / engine.dp_world_size)
    stats = {"trace_invalidations": getattr(getattr(engine.strategy, "trace", None), "invalidations", 0),
             "gathers": COMMS_LOG.totals(op="all_gather").count}
    with GatheredParameters(list(engine.module.parameters())):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return losses, state, stats


def _check(results: list, dp: int = 2) -> None:
    ref_losses, ref_state = _reference(dp)
    for rank, (losses, state, _) in enumerate(results):
        assert_close_rel(losses, ref_losses, what=f"rank {rank} losses")
        for name, value in state.items():
            assert_close_rel(value, ref_state[name], what=f"rank {rank} {name}")


OPTIONS = {
    "all-sharded": {"stage3_param_persistence_threshold": 0},
    "default-persistence": {},
    "no-overlap": {"stage3_param_persistence_threshold": 0, "overlap_comm": False},
    "tight-prefetch": {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 10,
                       "stage3_max_live_parameters": 100, "stage3_max_reuse_distance": 0},
    "offload": {"stage3_param_persistence_threshold": 0, "offload_param": {"device": "cpu"},
                "offload_optimizer": {"device": "cpu"}},
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_zero3_tricky_model_matches_reference(option: str) -> None:
    results = run_ranks(_train, OPTIONS[option], world_size=2)
    _check(results)


def test_zero3_explicit_external_parameter() -> None:
    results = run_ranks(_train, OPTIONS["all-sharded"], True, world_size=2)
    _check(results)


def test_zero3_prefetch_follows_changing_branches() -> None:
    """The branch alternates, so the recorded trace is invalidated and re-recorded; results stay exact."""
    results = run_ranks(_train, OPTIONS["all-sharded"], world_size=2)
    _check(results)
    assert results[0][2]["trace_invalidations"] >= 1


def _backward_gathers() -> dict:
    """Each all-gather a 4-layer ZeRO-3 model starts per step: (in backward, asynchronous, units gathered then)."""
    from shardwise.zero import unit as unit_mod

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(4)])
    cfg = {"train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": 3, "stage3_module_granularity_threshold": 0,
                                 "stage3_param_persistence_threshold": 0}}
    engine, *_ = shardwise.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    strategy = engine.strategy
    started: list[tuple[bool, bool, int]] = []
    original = unit_mod.ParamUnit.gather

    def spy(self, async_op: bool = True) -> None:
        if self.state is unit_mod.UnitState.SHARDED:
            live = sum(u.state is not unit_mod.UnitState.SHARDED for u in strategy.units) + 1
            started.append((strategy._in_backward, async_op, live))
        original(self, async_op)

    unit_mod.ParamUnit.gather = spy
    per_step = []
    for _ in range(3):
        started.clear()
        loss = engine(torch.randn(4, WIDTH)).square().mean()
        engine.backward(loss)
        engine.step()
        per_step.append(list(started))
    unit_mod.ParamUnit.gather = original
    return {"per_step": per_step, "trace_len": len(strategy.trace.recorded)}


def test_zero3_backward_fetches_are_traced_and_prefetched() -> None:
    """Backward runs with grad mode off; its fetches are still recorded, so backward prefetches the units it
    needs next, the last forward unit stays gathered across the forward/backward turnaround, and the default
    prefetch window is one unit (no more than two gathered at once)."""
    result = run_ranks(_backward_gathers, world_size=2)[0]
    assert result["trace_len"] == 8, result  # 4 forward + 4 backward fetches
    steady = result["per_step"][-1]
    forward = [s for s in steady if not s[0]]
    backward = [s for s in steady if s[0]]
    assert len(forward) == 4, steady
    # the last layer is reused at the turnaround; the other three are gathered again in backward, ahead of need
    assert len(backward) == 3 and all(is_async for _, is_async, _ in backward), steady
    assert max(live for *_, live in steady) <= 2, steady
