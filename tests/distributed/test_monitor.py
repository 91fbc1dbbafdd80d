"""Monitors on 2 ranks: the events each backend wrote, read back with the backend's own reader (TensorBoard's
EventAccumulator, ``wandb leet inspect --json`` on the offline run, Comet's offline archive, the CSV files), equal
the step log's values (loss, lr) step by step, are keyed by global samples, come from rank 0 only, and the losses
match a single-process float64 PyTorch reference of the same model and data (fp32 engine: rtol 1e-5)."""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import shardwise
from tests.dist import run_ranks
from tests.models import mse_loss, rank_batch, reference_train, tiny_mlp

STEPS, GAS, DP, MICRO = 4, 2, 2, 4
TBS = GAS * DP * MICRO  # 16 samples per optimizer step
LR = 0.05


def _config(tmp: str, **monitors) -> dict:
    return {"train_batch_size": TBS, "gradient_accumulation_steps": GAS, "steps_per_print": 1,
            "wall_clock_breakdown": True, "optimizer": {"type": "SGD", "params": {"lr": LR}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                         "warmup_num_steps": 3, "warmup_type": "linear"}},
            **monitors}


def _train(config: dict, user_event: bool = False) -> dict:
    engine, *_ = shardwise.initialize(model=tiny_mlp(), config=config)
    lr0 = engine.get_lr()[0]
    backends = sorted(engine.monitor.backends)
    log = []
    for step in range(STEPS):
        for micro in range(GAS):
            x, y = rank_batch(step, engine.global_rank, micro)
            engine.backward(mse_loss(engine, x, y))
            engine.step()
        log.append({"samples": engine.global_samples, **engine.step_log.last})
    if user_event:
        engine.monitor.write_events([("Custom/accuracy", 0.75, engine.global_samples)])
    engine.destroy()  # finishes the wandb run / Comet experiment (the harness exits with os._exit)
    return {"log": log, "lr0": lr0, "backends": backends, "rank": engine.global_rank}


def _reference_losses(result: dict) -> list[float]:
    """Float64 single-process losses with the engine's learning rates (the lr logged after step s is step s+1's)."""
    used = [result["lr0"]] + [r["lr"] for r in result["log"]]
    losses, _ = reference_train(tiny_mlp(), STEPS, DP, GAS, lambda p: torch.optim.SGD(p, lr=LR),
                                scheduler_fn=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: used[s] / LR))
    return losses


def _check_series(series: dict[int, float], log: list[dict], key: str, rtol: float, what: str) -> None:
    assert sorted(series) == [r["samples"] for r in log], f"{what}: steps {sorted(series)}"
    for r in log:
        expected = r[key]
        assert series[r["samples"]] == pytest.approx(expected, rel=rtol, abs=1e-12), (what, r["samples"])


def _tensorboard(path: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path)
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _csv_series(path: str) -> tuple[list[str], dict[int, float]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {int(s): float(v) for s, v in rows[1:]}


def _wandb_history(wandb_dir: str) -> dict[str, dict[int, float]]:
    runs = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, runs  # rank 0 only
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    out = subprocess.run([wandb_cli, "leet", "inspect", "--json", runs[0]], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL, check=True).stdout
    series: dict[str, dict[int, float]] = {}
    for line in out.splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("type") == "history":
            item = record["history"]["item"]
            for key, value in item.items():
                if not key.startswith("_"):
                    series.setdefault(key, {})[int(item["_step"])] = value
    return series


def test_tensorboard_and_csv_events_match_the_step_log_and_the_reference(tmp_path) -> None:
    cfg = _config(str(tmp_path),
                  tensorboard={"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "run1"},
                  csv_monitor={"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "run1"})
    r0, r1 = run_ranks(_train, cfg, True)
    assert r0["backends"] == ["csv_monitor", "tensorboard"] and r1["backends"] == []  # rank 0 only
    log = r0["log"]
    assert [r["samples"] for r in log] == [TBS * (s + 1) for s in range(STEPS)]
    assert len({r["lr"] for r in log}) > 1  # the schedule moves, so the lr events are checked for real
    for r, ref in zip(log, _reference_losses(r0)):
        assert r["loss"] == pytest.approx(ref, rel=1e-5)

    tb = _tensorboard(str(tmp_path / "tb" / "run1"))  # output_path/job_name, as DeepSpeed
    _check_series(tb["Train/Samples/train_loss"], log, "loss", 1e-6, "tensorboard loss")  # stored as float32
    _check_series(tb["Train/Samples/lr"], log, "lr", 1e-6, "tensorboard lr")
    _check_series(tb["Train/Samples/samples_per_second"], log, "samples_per_s", 1e-6, "tensorboard throughput")
    for name in ("forward", "backward", "step"):
        times = tb[f"Train/Samples/elapsed_time_ms_{name}"]
        assert sorted(times) == [r["samples"] for r in log] and all(v > 0 for v in times.values()), name
    assert tb["Custom/accuracy"] == {TBS * STEPS: 0.75}
    assert "Train/Samples/loss_scale" not in tb  # fp16 only

    csv_dir = tmp_path / "csv" / "run1"
    header, loss = _csv_series(str(csv_dir / "Train_Samples_train_loss.csv"))
    assert header == ["step", "train_loss"]
    _check_series(loss, log, "loss", 1e-15, "csv loss")
    header, lr = _csv_series(str(csv_dir / "Train_Samples_lr.csv"))
    assert header == ["step", "lr"]
    _check_series(lr, log, "lr", 1e-15, "csv lr")
    assert (csv_dir / "Custom_accuracy.csv").read_text().splitlines() == ["step,accuracy", f"{TBS * STEPS},0.75"]


@pytest.mark.slow  # the W&B service takes a few seconds to start
def test_wandb_offline_run_history_matches_the_step_log(tmp_path) -> None:
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
           "WANDB_X_DISABLE_STATS": "true", "WANDB_DISABLE_GIT": "true"}
    cfg = _config(str(tmp_path), wandb={"enabled": True, "project": "shardwise-tests"})
    r0, r1 = run_ranks(_train, cfg, True, env=env, timeout=120)
    assert r0["backends"] == ["wandb"] and r1["backends"] == []
    log = r0["log"]
    history = _wandb_history(str(tmp_path))
    _check_series(history["Train/Samples/train_loss"], log, "loss", 1e-15, "wandb loss")
    _check_series(history["Train/Samples/lr"], log, "lr", 1e-15, "wandb lr")
    assert history["Custom/accuracy"] == {TBS * STEPS: 0.75}


def _comet_metrics(directory: str) -> dict[str, dict[int, float]]:
    from comet_ml.offline import unzip_offline_archive

    archives = glob.glob(os.path.join(directory, "*.zip"))
    assert len(archives) == 1, archives  # rank 0 only
    assert zipfile.is_zipfile(archives[0])
    unpacked = unzip_offline_archive(archives[0])
    series: dict[str, dict[int, float]] = {}
    with open(os.path.join(unpacked, "messages.json")) as f:
        for line in f:
            msg = json.loads(line)
            metric = msg.get("payload", {}).get("metric") if msg.get("type") == "metric_msg" else None
            if metric and metric["metricName"].startswith("Train/"):
                series.setdefault(metric["metricName"], {})[int(metric["step"])] = float(metric["metricValue"])
    return series


@pytest.mark.slow  # Comet's offline archive is written when the experiment ends (a few seconds)
def test_comet_offline_experiment_logs_every_samples_log_interval(tmp_path) -> None:
    cfg = _config(str(tmp_path), comet={"enabled": True, "online": False, "project": "shardwise-tests",
                                        "samples_log_interval": 2 * TBS})
    quiet = ("AUTO_LOG_ENV_CPU", "AUTO_LOG_ENV_GPU", "AUTO_LOG_ENV_HOST", "AUTO_LOG_ENV_DETAILS",
             "AUTO_LOG_GIT_METADATA", "AUTO_LOG_GIT_PATCH")
    env = {"COMET_OFFLINE_DIRECTORY": str(tmp_path), "COMET_DISABLE_AUTO_LOGGING": "1",
           **{f"COMET_{k}": "false" for k in quiet}}
    r0, _ = run_ranks(_train, cfg, env=env, timeout=120)
    log = r0["log"]
    due = [r for r in log if r["samples"] in (TBS, 3 * TBS)]  # first event, then every >= 2 steps' samples
    metrics = _comet_metrics(str(tmp_path))
    _check_series(metrics["Train/Samples/train_loss"], due, "loss", 1e-12, "comet loss")
    _check_series(metrics["Train/Samples/lr"], due, "lr", 1e-12, "comet lr")
