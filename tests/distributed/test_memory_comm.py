"""Memory and communication against ZeRO's formulas, on 2 ranks.

Memory: ``engine.memory_breakdown()`` after a step (optimizer state exists), per kind, within 5% of the formula
(P parameters, N ranks, Adam: 8 bytes of state per element, fp32 master 4):

=================  ==========  ==================  ==========  ==========  ==========================
layout             parameters  gradients           master      Adam state  total
=================  ==========  ==================  ==========  ==========  ==========================
stage 0 fp32       4P          4P                  0           8P          16P
stage 0 fp16       2P          2P                  4P          8P          16P
stage 0 bf16       2P          4P + 4P/N (fp32)    4P/N        8P/N        2P + 4P + 16P/N (BF16 opt.)
stage 1 bf16       2P          2P + 2P/N           4P/N        8P/N        2P + 2P + 14P/N
stage 2 bf16       2P          2P/N                4P/N        8P/N        2P + (2P + 12P)/N
stage 1/2 fp32     4P          4P + 4P/N | 4P/N    4P/N        8P/N        8P + 16P/N | 4P + 16P/N
=================  ==========  ==================  ==========  ==========  ==========================

Communication per optimizer step, from the comms log (``msg_bytes``: the full buffer an operation is about;
``wire_bytes``: what a rank sends on a ring), within 5% of theory: stage 0 one all-reduce of the P gradients;
stages 1/2 a reduce-scatter of P gradients plus an all-gather of P parameters (and an 8-byte norm all-reduce), which
on the wire is the same volume as the all-reduce: 2(N-1)/N x P elements. Stage 2 reduce-scatters at every
micro-step.
"""

from __future__ import annotations

import pytest

import shardwise
from shardwise.comm import COMMS_LOG
from shardwise.zero.estimate import estimate_model_states
from tests.dist import run_ranks
from tests.models import rank_batch, tiny_transformer

N = 2
B = {"fp32": 4, "bf16": 2, "fp16": 2}


def _config(stage: int, precision: str, gas: int = 1, offload: bool = False) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": stage}}
    if precision != "fp32":
        cfg[precision] = {"enabled": True, **({"initial_scale_power": 8} if precision == "fp16" else {})}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return cfg


def _run(cfg: dict, gas: int, steps: int) -> dict:
    engine, _, _, _ = shardwise.initialize(model=tiny_transformer(seed=0), config=cfg)
    rank = engine.topology.coord("dp")

    def step(i: int) -> None:
        for micro in range(gas):
            engine.backward(engine(*rank_batch(i, rank, micro, kind="gpt", batch=2)))
            engine.step()

    step(0)  # warm-up: optimizer state is created, build-time broadcasts are out of the log
    COMMS_LOG.reset()
    for i in range(1, steps + 1):
        step(i)
    ops = {}
    for op in ("all_reduce", "reduce_scatter", "all_gather", "broadcast"):
        t = COMMS_LOG.totals(op=op)
        ops[op] = {"msg": t.msg_bytes / steps, "wire": t.wire_bytes / steps, "count": t.count / steps}
    assert engine.skipped_steps == 0
    return {"memory": engine.memory_breakdown(), "ops": ops, "params": engine.module.num_parameters()}


def _formula(stage: int, precision: str, p: int) -> dict[str, float]:
    b = B[precision]
    if stage == 0:  # unpartitioned: full gradients, a full fp32 master for 16-bit models
        return {"parameters": b * p, "gradients": b * p, "master_weights": 0 if precision == "fp32" else 4 * p,
                "optimizer_states": 8 * p}
    grads = b * p + b * p / N if stage == 1 else b * p / N
    return {"parameters": b * p, "gradients": grads, "master_weights": 4 * p / N, "optimizer_states": 8 * p / N}


MEMORY = [(0, "fp32"), (0, "fp16"), (0, "bf16"), (1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16"), (2, "fp16")]


@pytest.mark.parametrize("stage,precision", MEMORY, ids=[f"s{s}-{p}" for s, p in MEMORY])
def test_model_state_bytes_match_the_zero_formula(stage: int, precision: str) -> None:
    results = run_ranks(_run, _config(stage, precision), 1, 1)
    p = results[0]["params"]
    expect = _formula(stage, precision, p)
    for rank, r in enumerate(results):
        mem = r["memory"]
        for kind, value in expect.items():
            assert abs(mem[kind] - value) <= 0.05 * value + 1, f"rank {rank} {kind}: {mem[kind]} vs {value:.0f}"
        total = sum(mem.values())
        assert abs(total - sum(expect.values())) <= 0.05 * sum(expect.values())
        est = estimate_model_states(p, N, stage, precision)
        assert abs(est.device_total - total) <= 0.05 * total, "shardwise-estimate disagrees with the engine"
    if stage == 2 and precision == "bf16":  # the example: 2P + (2P + 12P)/N
        assert abs(sum(results[0]["memory"].values()) - (2 * p + 14 * p / N)) <= 0.05 * (2 * p + 14 * p / N)


def test_offloaded_states_are_counted_and_estimated_on_the_host() -> None:
    results = run_ranks(_run, _config(2, "bf16", offload=True), 1, 1)
    p, mem = results[0]["params"], results[0]["memory"]
    est = estimate_model_states(p, N, 2, "bf16", offload_optimizer=True)
    assert abs(mem["master_weights"] + mem["optimizer_states"] - est.host) <= 0.05 * est.host
    assert abs(mem["parameters"] + mem["gradients"] - est.device_total) <= 0.05 * est.device_total


COMMS = [(0, "fp32", 1), (1, "fp32", 1), (2, "fp32", 1), (1, "bf16", 1), (2, "bf16", 1), (2, "fp32", 2),
         (1, "fp32", 2)]


@pytest.mark.parametrize("stage,precision,gas", COMMS, ids=[f"s{s}-{p}-gas{g}" for s, p, g in COMMS])
def test_bytes_per_step_match_theory(stage: int, precision: str, gas: int) -> None:
    results = run_ranks(_run, _config(stage, precision, gas), gas, 2)
    for r in results:
        p, ops = r["params"], r["ops"]
        grad = p * B[precision]
        assert ops["broadcast"]["count"] == 0
        ring = (N - 1) / N  # fraction of a buffer each rank sends in a ring reduce-scatter or all-gather
        if stage == 0:
            assert ops["reduce_scatter"]["count"] == 0 and ops["all_gather"]["count"] == 0
            assert abs(ops["all_reduce"]["msg"] - grad) <= 0.05 * grad
            wire, theory = ops["all_reduce"]["wire"], 2 * ring * grad
        else:
            scatters = gas if stage == 2 else 1  # stage 2 reduces every micro-step; stage 1 at the boundary
            assert abs(ops["reduce_scatter"]["msg"] - scatters * grad) <= 0.05 * scatters * grad
            assert abs(ops["all_gather"]["msg"] - grad) <= 0.05 * grad
            assert ops["all_reduce"]["msg"] <= 16  # only the global norm
            wire = ops["reduce_scatter"]["wire"] + ops["all_gather"]["wire"] + ops["all_reduce"]["wire"]
            theory = ring * grad * (scatters + 1)  # with one reduction per window: 2(N-1)/N P, as data parallel
        assert abs(wire - theory) <= 0.05 * theory, f"wire {wire:.0f} vs {theory:.0f}"


def test_bf16_optimizer_reduces_fp32_and_gathers_bf16() -> None:
    cfg = {**_config(0, "bf16"), "data_types": {"grad_accum_dtype": "fp32"}}  # the BF16 optimizer
    results = run_ranks(_run, cfg, 1, 2)
    p, ops = results[0]["params"], results[0]["ops"]
    assert abs(ops["reduce_scatter"]["msg"] - 4 * p) <= 0.05 * 4 * p  # fp32 gradient accumulation buffer
    assert abs(ops["all_gather"]["msg"] - 2 * p) <= 0.05 * 2 * p  # bf16 weights
