"""``shardwise.zero.estimate``: the model-state formulas, DeepSpeed's helper names, and the shardwise-estimate CLI."""

from __future__ import annotations

import json

import pytest
from torch import nn

from shardwise.zero import estimate as est
from shardwise.zero.estimate import (
    estimate_model_states,
    estimate_zero2_model_states_mem_needs,
    estimate_zero2_model_states_mem_needs_all_cold,
    estimate_zero2_model_states_mem_needs_all_live,
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_cold,
    estimate_zero3_model_states_mem_needs_all_live,
    main,
    parse_count,
)

P, N = 1_000_000_000, 8


@pytest.mark.parametrize("stage,precision,expected", [
    (0, "fp32", 16 * P),  # DDP with Adam: 4 + 4 + 8
    (0, "fp16", 16 * P),  # 2 + 2 + 4 (full master) + 8
    (0, "bf16", 16 * P),  # DeepSpeed 0.19's stage-0 bf16: bf16 grads + a full fp32 master
    (1, "bf16", 2 * P + 2 * P + 14 * P // N),
    (2, "bf16", 2 * P + 14 * P // N),  # the ZeRO paper's 2P + (2P + 12P)/N
    (3, "bf16", 16 * P // N),
    (1, "fp32", 8 * P + 16 * P // N),
    (2, "fp32", 4 * P + 16 * P // N),
])
def test_device_totals(stage: int, precision: str, expected: int) -> None:
    e = estimate_model_states(P, N, stage, precision)
    assert e.device_total == expected
    assert e.host == 0 and e.total == expected


def test_bf16_optimizer_total() -> None:
    """bf16 at stage 0 with fp32 accumulation is the BF16 optimizer: fp32 grads + partitioned master/state."""
    e = estimate_model_states(P, N, 0, "bf16", grad_accum_dtype="fp32")
    assert e.device_total == 2 * P + 4 * P + 16 * P // N


def test_per_kind_breakdown_stage2_bf16() -> None:
    e = estimate_model_states(P, N, 2, "bf16")
    assert (e.parameters, e.gradients, e.master_weights, e.optimizer_states) == (2 * P, 2 * P // N, 4 * P // N,
                                                                                 8 * P // N)


def test_offload_moves_master_and_state_to_the_host() -> None:
    on, off = estimate_model_states(P, N, 2, "bf16", offload_optimizer=True), estimate_model_states(P, N, 2, "bf16")
    assert on.device_total == 2 * P + 2 * P // N
    assert on.host == 12 * P // N
    assert on.total == off.total


def test_stage3_param_offload_hpz_and_working_set() -> None:
    base = estimate_model_states(P, N, 3, "bf16", largest_layer_params=50_000_000)
    assert base.parameters == 2 * P // N and base.working == 100_000_000
    hpz = estimate_model_states(P, N, 3, "bf16", hpz_partition_size=4)
    assert hpz.parameters == 2 * P // N + 2 * P // 4  # secondary partition over the 4 ranks of a node
    off = estimate_model_states(P, N, 3, "bf16", offload_optimizer=True, offload_param=True)
    assert off.parameters == 0 and off.host == 2 * P // N + 12 * P // N


def test_grad_accum_dtype_and_optimizer_state_size() -> None:
    fp32_accum = estimate_model_states(P, N, 2, "bf16", grad_accum_dtype="fp32")
    assert fp32_accum.gradients == 4 * P // N
    assert estimate_model_states(P, 1, 0, "fp32", optimizer="sgd").optimizer_states == 4 * P
    assert estimate_model_states(P, 1, 0, "fp32", optimizer=0).optimizer_states == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"stage": 4}, "stage"), ({"precision": "fp8"}, "precision"), ({"optimizer": "adafactor"}, "optimizer"),
    ({"offload_param": True, "stage": 2}, "stage 3"), ({"grad_accum_dtype": "int8"}, "grad_accum_dtype"),
])
def test_bad_arguments_name_the_problem(kwargs: dict, match: str) -> None:
    args = {"total_params": P, "world_size": N, "stage": 2, "precision": "bf16", **kwargs}
    with pytest.raises(ValueError, match=match):
        estimate_model_states(**args)


def test_deepspeed_zero2_helper_shape() -> None:
    cpu, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=8, num_nodes=1, cpu_offload=False)
    assert gpu == 2 * P + 14 * P // 8
    assert cpu == int(4 * P * 8 * 1.5)  # every rank's process builds the fp32 model on the host first
    cpu_off, gpu_off = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=8, cpu_offload=True)
    assert gpu_off == 2 * P + 2 * P // 8 and cpu_off > cpu


def test_deepspeed_zero3_helper_shape() -> None:
    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(P, 10_000_000, num_gpus_per_node=8, cpu_offload=False,
                                                              cpu_offload_params=False)
    assert largest == 20_000_000 and gpu == 16 * P // 8 + largest and cpu == 0
    _, gpu_off, _ = estimate_zero3_model_states_mem_needs(P, 10_000_000, num_gpus_per_node=8)
    assert gpu_off == 2 * P // 8 + 20_000_000  # gradient partition + gathered layer


def _model() -> nn.Module:
    m = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 100, bias=False))
    m[1].weight = m[0].weight  # tied: counted once
    return m


def test_printing_helpers(capsys: pytest.CaptureFixture) -> None:
    assert est.model_to_params(_model()) == 800 and est.largest_layer_params(_model()) == 800
    estimate_zero2_model_states_mem_needs_all_live(_model(), num_gpus_per_node=2)
    estimate_zero2_model_states_mem_needs_all_cold(7_000_000_000, num_gpus_per_node=8)
    estimate_zero3_model_states_mem_needs_all_live(_model())
    estimate_zero3_model_states_mem_needs_all_cold(7_000_000_000, 100_000_000, num_gpus_per_node=8, num_nodes=2)
    out = capsys.readouterr().out
    assert out.count("per CPU  |  per GPU") == 4
    assert "7000M total params" in out and "2 nodes" in out
    assert out.count("offload_optimizer=none") == 2 + 2 * 2  # zero2 tables: 1 each; zero3 tables: 2 each
    assert "offload_param=cpu , offload_optimizer=cpu , zero_init=1" in out


@pytest.mark.parametrize("text,value", [("7B", 7_000_000_000), ("350M", 350_000_000), ("1.3e9", 1_300_000_000),
                                        ("125000", 125_000), ("2.5k", 2500)])
def test_parse_count(text: str, value: int) -> None:
    assert parse_count(text) == value


def test_cli_table_and_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["--params", "7B", "--num_gpus", "8", "--stage", "2", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.strip().startswith("2  bf16")]
    assert len(rows) == 2  # with and without optimizer offload
    assert main(["--params", "1B", "--num_gpus", "4", "--stage", "all", "--precision", "all", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 * 3 * 2
    s2 = next(r for r in lines if r["stage"] == 2 and r["precision"] == "bf16" and not r["offload_optimizer"])
    assert s2["device_total"] == 2 * 10**9 + 14 * 10**9 // 4


def test_cli_reads_a_ds_config(tmp_path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(json.dumps({"train_batch_size": 16, "bf16": {"enabled": True},
                               "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}}))
    assert main(["--params", "1B", "--num_gpus", "2", "--config", str(cfg), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["stage"], row["precision"], row["offload_optimizer"]) == (1, "bf16", True)
    assert row["host"] == 12 * 10**9 // 2


def test_cli_rejects_a_bad_count(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--params", "lots"])
    assert "not a count" in capsys.readouterr().err


def test_16bit_master_weights_and_optimizer_states() -> None:
    """bf16_master_weights_and_grads halves the master; bf16_optimizer_states halves Adam's state too."""
    base = estimate_model_states(P, N, 2, "bf16")
    master = estimate_model_states(P, N, 2, "bf16", low_precision_master=True)
    both = estimate_model_states(P, N, 2, "bf16", low_precision_master=True, low_precision_optimizer_states=True)
    assert (master.master_weights, master.optimizer_states) == (2 * P // N, 8 * P // N)
    assert (both.master_weights, both.optimizer_states) == (2 * P // N, 4 * P // N)
    assert base.device_total - both.device_total == 6 * P // N
    s1 = estimate_model_states(P, N, 1, "bf16", grad_accum_dtype="fp32", low_precision_master=True)
    assert s1.gradients == 2 * P + 2 * P // N  # 16-bit gradients whatever grad_accum_dtype says
    with pytest.raises(ValueError, match="stage 1-3"):
        estimate_model_states(P, N, 0, "bf16", low_precision_master=True)
    with pytest.raises(ValueError, match="needs low_precision_master"):
        estimate_model_states(P, N, 2, "bf16", low_precision_optimizer_states=True)


def test_cli_16bit_master_flags_and_config(tmp_path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--params", "1B", "--num_gpus", "4", "--stage", "2", "--offload_optimizer", "none", "--json",
                 "--low_precision_master", "--low_precision_optimizer_states"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["master_weights"], row["optimizer_states"]) == (2 * 10**9 // 4, 4 * 10**9 // 4)
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 3},
                               "bf16": {"enabled": True, "bf16_master_weights_and_grads": True,
                                        "bf16_optimizer_states": True}}))
    assert main(["--params", "1B", "--num_gpus", "2", "--config", str(cfg), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["master_weights"], row["optimizer_states"]) == (10**9, 2 * 10**9)
