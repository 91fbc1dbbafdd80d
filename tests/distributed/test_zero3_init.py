"""``zero.Init`` (build partitioned, never holding the whole model) and ``GatheredParameters``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shardwise
from shardwise.accelerator import get_accelerator
from shardwise.zero import GatheredParameters, Init
from tests.dist import run_ranks
from tests.models import assert_close_rel, mse_loss, rank_batch, reference_train, tiny_mlp

LAYERS, WIDTH = 32, 1024  # 33.6M fp32 parameters: 134 MB in full, 34 MB per rank on 4 ranks


def _build_big_model_in_init() -> dict[str, float]:
    acc = get_accelerator()
    torch.manual_seed(0)
    before = acc.memory_allocated()
    acc.reset_peak_memory_stats()
    with Init():
        model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])
    peak = acc.max_memory_allocated() - before
    held = sum(p._sw_init_shard.numel() * 4 for p in model.parameters())
    assert all(p.numel() == 0 for p in model.parameters())
    return {"peak": peak / 2**20, "held": held / 2**20}


@pytest.mark.world4
def test_init_never_holds_the_whole_model() -> None:
    results = run_ranks(_build_big_model_in_init, world_size=4, timeout=120)
    full_mb = LAYERS * WIDTH * WIDTH * 4 / 2**20
    share_mb = full_mb / 4
    layer_mb = WIDTH * WIDTH * 4 / 2**20
    # bound: this rank's share + the module being built and its broadcast buffer + 24 MB of allocator slack
    bound = share_mb + 2 * layer_mb + 24
    for rank, r in enumerate(results):
        assert abs(r["held"] - share_mb) < 0.01, r
        assert r["peak"] < bound, f"rank {rank}: peak RSS grew {r['peak']:.1f} MB > bound {bound:.1f} MB"
        assert r["peak"] < 0.6 * full_mb, f"rank {rank}: {r['peak']:.1f} MB is not well below the full {full_mb} MB"


def _train_from_init(steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    with Init():
        model = tiny_mlp(seed=0)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.05,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                 "stage3_module_granularity_threshold": 0}}
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
    losses = []
    for step in range(steps):
        x, y = rank_batch(step, engine.topology.coord("dp"))
        loss = mse_loss(engine, x, y)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        shardwise.comm.all_reduce(total)
        losses.append(total.item() / 2)
    with GatheredParameters(list(engine.module.parameters())):
        return losses, {k: v.clone() for k, v in engine.module.state_dict().items()}


def test_model_built_in_init_trains_like_the_reference() -> None:
    results = run_ranks(_train_from_init, 4, world_size=2)
    ref_losses, ref_state = reference_train(tiny_mlp(seed=0), 4, 2, 1,
                                            lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01), clip=0.05)
    for losses, state in results:
        assert_close_rel(losses, ref_losses, what="losses")
        for k, v in state.items():
            assert_close_rel(v, ref_state[k], what=k)


def _modify_on_rank0() -> dict[str, torch.Tensor]:
    cfg = {"train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                 "stage3_module_granularity_threshold": 0}}
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    first = engine.module[0]
    with GatheredParameters([first.weight, first.bias], modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            first.weight.data.fill_(0.5)
            first.bias.data.fill_(-1.0)
    assert first.weight.numel() == 0  # released again
    # one optimizer step: it must start from the modified values, so the fp32 masters were updated too
    x, y = rank_batch(0, engine.topology.coord("dp"))
    loss = mse_loss(engine, x, y)
    engine.backward(loss)
    engine.step()
    with GatheredParameters([first.weight, first.bias]):
        return {"weight": first.weight.detach().clone(), "bias": first.bias.detach().clone()}


def test_gathered_parameters_modifier_rank_reaches_every_rank_and_the_masters() -> None:
    results = run_ranks(_modify_on_rank0, world_size=2)
    # after one SGD step from 0.5 / -1.0 the values moved by lr * grad; both ranks agree exactly
    torch.testing.assert_close(results[0]["weight"], results[1]["weight"], rtol=0, atol=0)
    torch.testing.assert_close(results[0]["bias"], results[1]["bias"], rtol=0, atol=0)
    assert (results[0]["weight"] - 0.5).abs().max() < 0.1  # started from the modified values, not the init
    assert (results[0]["bias"] + 1.0).abs().max() < 0.1
