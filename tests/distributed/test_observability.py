"""On 2 ranks: the flops profiler inside training (rank 0 reports the profile step, with the analytic FLOPs of the
model), ``comm.log_summary()`` (DeepSpeed's table from the comms log, rank 0 prints, bandwidth arithmetic,
straggler split), the ``memory_breakdown`` table and ``see_memory_usage``, and checkpoint progress lines."""

from __future__ import annotations

import contextlib
import io
import logging

import pytest
import torch

import shardwise
from shardwise import comm
from shardwise.comm import COMMS_LOG
from tests.dist import run_ranks
from tests.models import mse_loss, rank_batch, tiny_mlp

MICRO = 4
# tiny_mlp: Linear 8->16, 16->16, 16->16, 16->4 on a micro-batch of 4 rows: 2 FLOPs per multiply-add
MLP_FWD_FLOPS = 2 * MICRO * (8 * 16 + 16 * 16 + 16 * 16 + 16 * 4)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _capture() -> _Capture:
    handler = _Capture()
    logging.getLogger("shardwise").addHandler(handler)
    logging.getLogger("shardwise").setLevel(logging.INFO)
    return handler


def _train(engine, steps: int) -> None:
    for step in range(steps):
        for micro in range(engine.gradient_accumulation_steps()):
            x, y = rank_batch(step, engine.global_rank, micro, batch=MICRO)
            engine.backward(mse_loss(engine, x, y))
            engine.step()


def _profiled(path: str) -> dict:
    cfg = {"train_batch_size": 16, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
           "flops_profiler": {"enabled": True, "profile_step": 1, "module_depth": -1, "top_modules": 2,
                              "detailed": True, "output_file": path, "peak_tflops": 0.001}}
    engine, *_ = shardwise.initialize(model=tiny_mlp(), config=cfg)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in engine.module.modules())
    _train(engine, 3)
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in engine.module.modules())
    return {"profiler": engine._observer.flops_profiler is not None, "hooks": (hooks, after)}


def test_flops_profiler_in_training_reports_the_profile_step_on_rank_0(tmp_path) -> None:
    out = tmp_path / "flops.txt"
    r0, r1 = run_ranks(_profiled, str(out))
    assert r0["profiler"] and not r1["profiler"]  # DeepSpeed profiles on rank 0 only
    assert r0["hooks"][0] == r0["hooks"][1]  # the per-module hooks are gone after the profile step
    text = out.read_text()
    assert "Profile summary at step 1:" in text
    values = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in text.splitlines() if ":" in line}
    from shardwise.profiling.flops_profiler import number_to_string

    assert values["fwd flops per device"] == number_to_string(MLP_FWD_FLOPS).strip()
    assert values["params per device"] == str(sum(p.numel() for p in tiny_mlp().parameters()))
    assert values["data parallel size"] == "2" and values["batch size per device"] == str(MICRO)
    assert values["iter latency (2 micro-batches)"].endswith("s")
    assert any(k.startswith("MFU = FLOPS per device / peak 1 GFLOPS") and v.endswith("%") for k, v in values.items())


def _comm_summary() -> dict:
    COMMS_LOG.reset()
    small, big = torch.ones(1024), torch.ones(4096)
    for _ in range(3):
        comm.all_reduce(small)
    comm.all_reduce(big, async_op=True).wait()
    out = torch.zeros(2 * 256)
    comm.all_gather_into_tensor(out, torch.ones(256))
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        result = comm.log_summary(show_straggler=True, return_dict=True)
    return {"text": text.getvalue(), "result": result}


def test_log_summary_prints_deepspeeds_table_on_rank_0() -> None:
    r0, r1 = run_ranks(_comm_summary)
    assert r1["text"] == ""
    lines = r0["text"].splitlines()
    assert lines[0].split("  ")[0] == "Comm. Op" and "busbw_avg (Gbps)" in lines[0]
    assert "all_reduce" in lines and "all_gather" in lines and "Breakdown with straggler effect" in lines
    for r in (r0, r1):
        summary = r["result"]["summary"]
        assert sorted(summary["all_reduce"]) == [4096, 16384] and list(summary["all_gather"]) == [2048]
        small, big, gather = summary["all_reduce"][4096], summary["all_reduce"][16384], summary["all_gather"][2048]
        assert (small["count"], big["count"], gather["count"]) == (3, 1, 1)
        assert small["msg_size_str"] == "4.0 KB" and big["total_latency_ms"] > 0  # the async one was timed at wait
        seconds = small["avg_latency_ms"] / 1e3
        assert small["tput_avg_gbps"] == pytest.approx(2 * 4096 * 8 / 1e9 / seconds)  # all-reduce: 2S/t
        assert small["busbw_avg_gbps"] == pytest.approx(small["tput_avg_gbps"] / 2)  # 2(n-1)/n S/t with n=2
        assert gather["busbw_avg_gbps"] == pytest.approx(gather["tput_avg_gbps"] / 2)  # (n-1)/n S/t
        assert r["result"]["metadata"]["world_size"] == 2
    fastest = [r["result"]["straggler_analysis"]["all_reduce"][4096]["total_comm_lat_ms"] for r in (r0, r1)]
    assert fastest[0] == fastest[1] == min(r["result"]["summary"]["all_reduce"][4096]["total_latency_ms"]
                                           for r in (r0, r1))


def _memory(tmp: str) -> dict:
    logs = _capture()
    cfg = {"train_batch_size": 16, "gradient_accumulation_steps": 2, "steps_per_print": 2, "memory_breakdown": True,
           "zero_optimization": {"stage": 1}, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    engine, *_ = shardwise.initialize(model=tiny_mlp(), config=cfg)
    _train(engine, 2)
    tables = [line for line in logs.lines if line.startswith("memory at step")]
    from shardwise.utils.memory import memory_breakdown_rows, see_memory_usage

    rows = memory_breakdown_rows(engine, 0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        see_memory_usage("after training", force=True)
        see_memory_usage("not forced")
    return {"tables": tables, "rows": rows, "states": engine.memory_breakdown(), "printed": printed.getvalue()}


def test_memory_breakdown_table_and_see_memory_usage() -> None:
    r0, r1 = run_ranks(_memory, "")
    assert len(r0["tables"]) == 1 and r1["tables"] == []  # steps_per_print 2, 2 steps; rank 0 prints
    table = r0["tables"][0].splitlines()
    assert table[0].startswith("memory at step 2") and [int(line.split()[0]) for line in table[2:]] == [0, 1]
    for rank, r in enumerate((r0, r1)):
        row = r0["rows"][rank]
        assert row[:4] == [float(r["states"][k]) for k in ("parameters", "gradients", "master_weights",
                                                           "optimizer_states")]
        assert row[4] == sum(r["states"].values()) and row[5] >= row[7] > 0  # peak >= allocated now
        printed = float(table[2 + rank].split()[5]) * 2**20  # the "states" column, MB with one decimal
        assert abs(printed - row[4]) <= 0.05 * 2**20
    assert r0["states"]["optimizer_states"] == r1["states"]["optimizer_states"] > 0  # ZeRO-1: an even split
    assert r0["printed"].startswith("after training\nMA ") and "Max_MA" in r0["printed"]
    assert "CPU Virtual Memory" in r0["printed"] and r1["printed"] == ""


def _checkpoint_progress(path: str) -> dict:
    logs = _capture()
    cfg = {"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    engine, *_ = shardwise.initialize(model=tiny_mlp(), config=cfg)
    engine.save_checkpoint(path, tag="t")
    engine.load_checkpoint(path, tag="t")
    return [line for line in logs.lines if line.startswith(("writing ", "loading "))]


def test_checkpoint_save_and_load_report_progress_on_rank_0(tmp_path) -> None:
    r0, r1 = run_ranks(_checkpoint_progress, str(tmp_path), env={"SHARDWISE_PROGRESS": "1"})
    assert r1 == []
    writes = [line for line in r0 if line.startswith("writing ")]
    loads = [line for line in r0 if line.startswith("loading ")]
    assert writes and writes[-1].startswith("writing ") and ": done, " in writes[-1]
    assert loads and ": done, " in loads[-1] and "% (1 of " in loads[0]  # counted in tensors
