"""Monitor pieces in one process: the missing-package error (at initialize, naming the pip line), DeepSpeed's CSV
layout, Comet's samples_log_interval, the Trackio calls (against a stand-in module: trackio is not installed
here), ``get_monitor_config``, the progress reporter and ``shardwise-plot``."""

from __future__ import annotations

import importlib.machinery
import logging
import sys
import types

import pytest

from shardwise.common.progress import progress
from shardwise.config import ConfigError, load_config
from shardwise.monitor import MonitorMaster, check_backends
from shardwise.monitor import utils as monitor_utils
from shardwise.monitor.comet import EventsLogScheduler
from shardwise.monitor.config import get_monitor_config
from shardwise.monitor.csv_monitor import csvMonitor, event_file_name

BASE = {"train_batch_size": 4}


def test_missing_backend_package_is_a_config_error_naming_the_pip_install(monkeypatch) -> None:
    real = monitor_utils.importlib.util.find_spec
    monkeypatch.setattr(monitor_utils.importlib.util, "find_spec",
                        lambda name: None if name in ("tensorboard", "wandb") else real(name))
    cfg = load_config({**BASE, "tensorboard": {"enabled": True}, "wandb": {"enabled": True},
                       "csv_monitor": {"enabled": True}}, log=False)
    with pytest.raises(ConfigError) as info:
        check_backends(cfg)
    assert {p.path for p in info.value.problems} == {"tensorboard.enabled", "wandb.enabled"}
    text = str(info.value)
    assert 'pip install "shardwise[tensorboard]"' in text and 'pip install "wandb"' in text
    assert '"tensorboard": {"enabled": false}' in text and info.value.kind == "missing_package"
    check_backends(load_config({**BASE, "tensorboard": {"enabled": False}}, log=False))  # disabled: no check


def test_too_old_comet_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(monitor_utils.importlib.metadata, "version", lambda name: "3.40.2")
    with pytest.raises(ConfigError, match=r'needs comet_ml>=3\.41\.0, but comet_ml 3\.40\.2 is installed'):
        check_backends(load_config({**BASE, "comet": {"enabled": True}}, log=False))


def test_csv_monitor_uses_deepspeeds_file_names_and_headers(tmp_path) -> None:
    cfg = get_monitor_config({"csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "job"}})
    assert cfg.enabled and not cfg.tensorboard.enabled
    mon = csvMonitor(cfg.csv_monitor)
    mon.write_events([("Train/Samples/lr", 0.1, 8), ("my metric", 2, 8)])
    csvMonitor(cfg.csv_monitor).write_events([("Train/Samples/lr", 0.2, 16)])  # a resumed run appends
    assert event_file_name("Train/Samples/lr") == "Train_Samples_lr.csv"
    assert (tmp_path / "job" / "Train_Samples_lr.csv").read_text().splitlines() == ["step,lr", "8,0.1", "16,0.2"]
    assert (tmp_path / "job" / "my_metric.csv").read_text().splitlines() == ["step,my metric", "8,2"]


def test_monitor_master_fans_out_and_closes(tmp_path) -> None:
    cfg = get_monitor_config({"csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "j"}})
    master = MonitorMaster(cfg)  # no process group: rank 0
    assert master.enabled and master.csv_monitor is not None and master.tb_monitor is None
    import torch

    master.write_events([("a/b", torch.tensor(1.5), 3)])  # tensors become numbers
    master.close()
    master.write_events([("a/b", 9.0, 4)])  # after close: dropped
    assert (tmp_path / "j" / "a_b.csv").read_text().splitlines() == ["step,b", "3,1.5"]


def test_comet_logs_each_event_once_per_samples_interval() -> None:
    sched = EventsLogScheduler(100)
    due = [s for s in (8, 50, 108, 150, 208, 300, 308) if sched.needs_logging("loss", s)]
    assert due == [8, 108, 208, 308]
    assert sched.needs_logging("lr", 300)  # per event name


def test_trackio_backend_calls(monkeypatch, tmp_path) -> None:
    calls = []
    fake = types.ModuleType("trackio")
    fake.__spec__ = importlib.machinery.ModuleSpec("trackio", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or object()
    fake.log = lambda metrics, step=None: calls.append(("log", metrics, step))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    cfg = load_config({**BASE, "trackio": {"enabled": True, "project": "p1"}}, log=False)
    check_backends(cfg)
    master = MonitorMaster(cfg)
    master.write_events([("Train/Samples/lr", 0.5, 4)])
    master.close()
    assert calls == [("init", {"project": "p1"}), ("log", {"Train/Samples/lr": 0.5}, 4), ("finish",)]


def test_progress_is_silent_for_short_work_and_reports_long_work(monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="shardwise")
    assert list(progress(range(5), "quick")) == list(range(5))
    assert not [r for r in caplog.records if "quick" in r.getMessage()]
    monkeypatch.setenv("SHARDWISE_PROGRESS", "1")  # report from the first item
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    sizes = [2**20, 3 * 2**20]
    assert list(progress(sizes, "writing x", weight=lambda n: n, unit="B", interval=0.0)) == sizes
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("writing x")]
    assert lines[0].startswith("writing x: 25% (1.0 MB of 4.0 MB") and lines[1].startswith("writing x: 100%")
    assert lines[-1].startswith("writing x: done, 4.0 MB in")
    monkeypatch.setenv("SHARDWISE_PROGRESS", "0")
    caplog.clear()
    assert list(progress([1, 2], "off", interval=0.0)) == [1, 2] and not caplog.records


def test_shardwise_plot_reads_csv_and_tensorboard_runs(tmp_path, capsys) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from shardwise.monitor import plot

    cfg = get_monitor_config({"csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"),
                                              "job_name": "job"}})
    events = [(f"Train/Samples/{name}", value * (s + 1), 16 * (s + 1)) for s in range(3)
              for name, value in (("train_loss", 1.0), ("lr", 0.01), ("samples_per_second", 100.0),
                                  ("peak_memory_MB", 50.0))]
    csvMonitor(cfg.csv_monitor).write_events(events)
    writer = SummaryWriter(str(tmp_path / "tb" / "job"))
    for name, value, step in events:
        writer.add_scalar(name, value, step)
    writer.close()
    expected = {}
    for name, value, step in events:
        expected.setdefault(name, []).append((step, value))
    assert plot.read_run(tmp_path / "csv") == expected
    tb = plot.read_run(tmp_path / "tb")
    assert tb.keys() == expected.keys()
    for name, points in tb.items():  # TensorBoard stores float32
        assert [s for s, _ in points] == [s for s, _ in expected[name]]
        assert [v for _, v in points] == pytest.approx([v for _, v in expected[name]], rel=1e-6)
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "png")]) == 0
    written = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["loss.png", "lr.png", "memory.png", "throughput.png"]
    assert all((tmp_path / "png" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in ("loss.png", "lr.png"))
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "missing")])


def test_deepspeed_paths_resolve() -> None:
    import shardwise as deepspeed

    assert deepspeed.monitor.monitor.MonitorMaster is MonitorMaster
    from shardwise.profiling.flops_profiler import FlopsProfiler, get_model_profile

    assert deepspeed.profiling.flops_profiler.FlopsProfiler is FlopsProfiler and callable(get_model_profile)
    assert callable(deepspeed.comm.log_summary)
    from shardwise.utils.memory import see_memory_usage

    assert callable(see_memory_usage)
