"""Loading into a different layout: saved at (dp=4, ZeRO-3) -> loaded at (dp=2, ZeRO-1) and (dp=1, stage 0), and
back from (dp=2, ZeRO-1) to (dp=4, ZeRO-2). The loaded fp32 masters and Adam state equal the saved ones bit for bit;
training continues with the losses of an uninterrupted run at the new layout.

The data is layout-independent: every step uses the same 16 samples, split over (rank, micro-step) however the
layout needs, so all layouts follow the same trajectory up to floating-point reduction order.
"""

from __future__ import annotations

import pytest
import torch

import shardwise
from shardwise import comm
from shardwise.checkpoint import optim_state
from tests.dist import run_ranks
from tests.models import assert_close_rel, mse_loss, rank_batch, tiny_mlp

GLOBAL_BATCH, MICRO = 16, 4


def _config(stage: int, dp: int) -> dict:
    return {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": GLOBAL_BATCH // (MICRO * dp),
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.01}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 200,
                                  "stage3_param_persistence_threshold": 0}}


def _samples(step: int, rank: int, micro: int, gas: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7000 + step)
    x, y = torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)
    lo = (rank * gas + micro) * MICRO
    return x[lo : lo + MICRO], y[lo : lo + MICRO]


def _fragments(engine) -> dict:
    """This rank's pieces of every parameter's fp32 master and optimizer state (copies)."""
    out = {}
    for name, p in engine.module.named_parameters():
        out[name] = [(f.start, f.end, {"fp32": f.fp32.clone(), **{k: v.clone() for k, v in f.state.items()}})
                     for f in engine.strategy.fragments(p)]
    return out


def _run(stage: int, load_dir: str | None, save_dir: str | None, stop: int) -> dict:
    dp = comm.get_world_size()
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=_config(stage, dp))
    loaded = None
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
        loaded = (_fragments(engine), optim_state.group_scalars(engine.optimizer.basic))
    rank, gas = engine.topology.coord("dp"), engine.gradient_accumulation_steps()
    losses = []
    for step in range(engine.global_steps, stop):
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(gas):
            loss = mse_loss(engine, *_samples(step, rank, micro, gas))
            engine.backward(loss)
            engine.step()
            total += loss.detach().double()
        comm.all_reduce(total)
        losses.append(total.item() / (dp * gas))
    final = (_fragments(engine), optim_state.group_scalars(engine.optimizer.basic))
    if save_dir is not None:
        engine.save_checkpoint(save_dir)
    return {"losses": losses, "loaded": loaded, "final": final}


def _assemble(per_rank: list[dict]) -> dict[tuple[str, str], torch.Tensor]:
    """Full tensors from every rank's fragments; asserts each element is covered."""
    full, seen = {}, {}
    for frags in per_rank:
        for name, pieces in frags.items():
            for start, end, values in pieces:
                for kind, t in values.items():
                    key = (name, kind)
                    n = max(end, full[key].numel() if key in full else 0)
                    if key not in full or full[key].numel() < n:
                        grown = torch.full((n,), float("nan"))
                        if key in full:
                            grown[: full[key].numel()] = full[key]
                        full[key] = grown
                    full[key][start:end] = t
                    seen[key] = seen.get(key, 0) + (end - start)
    for key, t in full.items():
        assert not torch.isnan(t).any(), f"{key}: elements not covered by any fragment"
    return full


def _assert_same_state(a: list, b: list, what: str) -> None:
    fa, fb = _assemble([r[0] for r in a]), _assemble([r[0] for r in b])
    assert fa.keys() == fb.keys(), what
    for key in fa:
        assert torch.equal(fa[key], fb[key]), f"{what}: {key} differs"
    assert a[0][1] == b[0][1], f"{what}: optimizer scalar state differs"


@pytest.mark.world4
def test_reshard_stage3_dp4_to_stage1_dp2_stage0_dp1_and_back(tmp_path) -> None:
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    saved = run_ranks(_run, 3, None, first, 5, world_size=4)
    at_dp2 = run_ranks(_run, 1, first, second, 10, world_size=2)
    at_dp1 = run_ranks(_run, 0, first, None, 10, world_size=1)
    _assert_same_state([r["final"] for r in saved], [r["loaded"] for r in at_dp2], "dp4/ZeRO-3 -> dp2/ZeRO-1")
    _assert_same_state([r["final"] for r in saved], [r["loaded"] for r in at_dp1], "dp4/ZeRO-3 -> dp1/stage 0")
    # continued training equals an uninterrupted run at the new layout (reduction order differs in steps 1-5 only)
    uninterrupted = run_ranks(_run, 1, None, None, 10, world_size=2)
    assert_close_rel(at_dp2[0]["losses"], uninterrupted[0]["losses"][5:], rtol=1e-6, atol=0, what="dp2 losses")
    assert_close_rel(at_dp1[0]["losses"], uninterrupted[0]["losses"][5:], rtol=1e-6, atol=0, what="dp1 losses")
    assert_close_rel(saved[0]["losses"], uninterrupted[0]["losses"][:5], rtol=1e-6, atol=0, what="dp4 losses")
    # and back: saved at (dp=2, ZeRO-1) after step 10 -> (dp=4, ZeRO-2), exactly
    back = run_ranks(_run, 2, second, None, 10, world_size=4)
    _assert_same_state([r["final"] for r in at_dp2], [r["loaded"] for r in back], "dp2/ZeRO-1 -> dp4/ZeRO-2")


def test_reshard_between_stages_at_the_same_size(tmp_path) -> None:
    """dp=2: ZeRO-2 -> ZeRO-3 and stage 0 -> ZeRO-2, state exact, training continues identically."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    saved = run_ranks(_run, 2, None, a, 3, world_size=2)
    as3 = run_ranks(_run, 3, a, None, 5, world_size=2)
    _assert_same_state([r["final"] for r in saved], [r["loaded"] for r in as3], "ZeRO-2 -> ZeRO-3")
    saved0 = run_ranks(_run, 0, None, b, 3, world_size=2)
    as2 = run_ranks(_run, 2, b, None, 5, world_size=2)
    _assert_same_state([r["final"] for r in saved0], [r["loaded"] for r in as2], "stage 0 -> ZeRO-2")
    assert_close_rel(as3[0]["losses"], as2[0]["losses"], rtol=1e-6, atol=0, what="continued losses")


# -- tensor parallelism: uneven and fused splits -----------------------------------------------------------------
def _tp_net(tp: int):
    """up: 8 -> [5 | 14] fused output blocks (column-parallel), down: 19 -> 4 (row-parallel over the same blocks)."""
    from torch import nn

    torch.manual_seed(11)
    up, down = nn.Linear(8, 19), nn.Linear(19, 4)
    if tp == 1:
        return nn.ModuleDict({"up": up, "down": down}), None
    from shardwise.comm.topology import Topology
    from shardwise.tp import ColumnParallelLinear, ModelParallelUnit, RowParallelLinear

    topo = Topology(tp=tp)
    net = nn.ModuleDict({"up": ColumnParallelLinear.from_linear(up, topo, parts=[5, 14]),
                         "down": RowParallelLinear.from_linear(down, topo, parts=[5, 14])})
    return net, ModelParallelUnit(topo)


class _Forward(torch.nn.Module):
    def __init__(self, net) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net["down"](torch.tanh(self.net["up"](x)))


def _tp_run(tp: int, load_dir: str | None, save_dir: str | None, stop: int, stage: int = 1) -> dict:
    net, mpu = _tp_net(tp)
    cfg = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 50}}
    engine, _, _, _ = shardwise.initialize(model=_Forward(net), config=cfg, mpu=mpu)
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
    single = engine.dp_world_size == 1
    loaded = _full_tp_state(engine) if single else None
    losses = []
    for step in range(engine.global_steps, stop):
        loss = mse_loss(engine, *rank_batch(step, engine.topology.coord("dp")))
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        comm.all_reduce(total)
        losses.append(total.item())
    if save_dir is not None:
        engine.save_checkpoint(save_dir)
    return {"losses": losses, "loaded": loaded, "final": _full_tp_state(engine) if single else None}


def _full_tp_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights and Adam moments (tensor-parallel layers gather their blocks into the full layout)."""
    out = {}
    for mname in ("up", "down"):
        layer = engine.module.net[mname]
        for pname in ("weight", "bias"):
            p = getattr(layer, pname)
            (frag,) = engine.strategy.fragments(p)  # dp = 1: one fragment holds the whole local tensor
            for kind, flat in (("fp32", frag.fp32), *frag.state.items()):
                local = flat.view(p.shape)
                full = layer.gather_full(pname, local) if hasattr(layer, "gather_full") else local.clone()
                out[f"{mname}.{pname}:{kind}"] = full
    return out


def test_tensor_parallel_checkpoint_loads_without_tensor_parallelism_and_back(tmp_path) -> None:
    """tp=2 with uneven, fused (Q|K|V-like) blocks -> tp=1 -> tp=2: state exact, losses continue."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    saved = run_ranks(_tp_run, 2, None, a, 3, world_size=2)
    plain = run_ranks(_tp_run, 1, a, b, 6, world_size=1)
    back = run_ranks(_tp_run, 2, b, None, 6, world_size=2)
    for key, value in saved[0]["final"].items():
        assert torch.equal(plain[0]["loaded"][key], value), key
    for key, value in plain[0]["final"].items():
        assert torch.equal(back[1]["loaded"][key], value), key
    uninterrupted = run_ranks(_tp_run, 2, None, None, 6, world_size=2)
    assert_close_rel([x / 2 for x in uninterrupted[0]["losses"][3:]], plain[0]["losses"], rtol=1e-6, atol=0,
                     what="tp=1 losses")


@pytest.mark.world4
def test_tensor_parallel_with_zero_partitions_cut_inside_fused_blocks(tmp_path) -> None:
    """tp=2 x dp=2, ZeRO-2 with tiny buckets: partitions cut the local weights mid-row, inside fused blocks."""
    a = str(tmp_path / "a")
    run_ranks(_tp_run, 2, None, a, 3, 2, world_size=4)
    resumed = run_ranks(_tp_run, 2, a, None, 6, 2, world_size=4)
    without_tp = run_ranks(_tp_run, 1, a, None, 6, 1, world_size=2)
    uninterrupted = run_ranks(_tp_run, 2, None, None, 6, 2, world_size=4)
    assert resumed[0]["losses"] == uninterrupted[0]["losses"][3:]
    # the all-reduced loss sums tp copies at tp=2: halve it to compare with tp=1
    assert_close_rel([x / 2 for x in uninterrupted[0]["losses"][3:]], without_tp[0]["losses"], rtol=1e-6, atol=0,
                     what="tp=1 losses after loading a tp=2 x dp=2 checkpoint")


# -- pipeline parallelism: names are global (layer index, tied_modules.*), so stages just add pieces ---------------
def _pipe_run(stages: int, load_dir: str | None, save_dir: str | None, stop: int) -> list[float]:
    import torch.nn.functional as F

    from shardwise.pipe import PipelineModule
    from tests.pipe_models import BASE_SEED, pair_mlp_specs

    model = PipelineModule(pair_mlp_specs(2), num_stages=stages, loss_fn=F.mse_loss, seed_layers=True,
                           base_seed=BASE_SEED, partition_method="uniform")
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
           "zero_optimization": {"stage": 1}}
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
    dp = engine.topology.coord("dp")
    losses = [engine.train_batch(iter([rank_batch(step, dp, m) for m in range(2)])).item()
              for step in range(engine.global_steps, stop)]
    if save_dir is not None:
        engine.save_checkpoint(save_dir)
    return losses


@pytest.mark.world4
def test_pipeline_checkpoint_resumes_at_other_stage_counts(tmp_path) -> None:
    """Saved at pp=2 x dp=2 (ZeRO-1, a weight tied across the stages) -> pp=1 x dp=2 and pp=4 x dp=1."""
    a = str(tmp_path / "a")
    run_ranks(_pipe_run, 2, None, a, 2, world_size=4)
    one_stage = run_ranks(_pipe_run, 1, a, None, 4, world_size=2)
    reference = run_ranks(_pipe_run, 1, None, None, 4, world_size=2)
    assert_close_rel(one_stage[0], reference[0][2:], rtol=1e-6, atol=0, what="pp=1 after pp=2")
    four_stages = run_ranks(_pipe_run, 4, a, None, 4, world_size=4)
    single_rank = run_ranks(_pipe_run, 1, a, None, 4, world_size=1)  # the same data as pp=4 x dp=1
    assert_close_rel(four_stages[0], single_rank[0], rtol=1e-6, atol=0, what="pp=4 after pp=2")
