"""Accelerator selection: SHARDWISE_ACCELERATOR, then DS_ACCELERATOR, then detection; clear errors."""

from __future__ import annotations

import pytest
import torch

from shardwise import accelerator
from shardwise.accelerator import AcceleratorError, get_accelerator, set_accelerator
from shardwise.utils import report


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("SHARDWISE_ACCELERATOR", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    set_accelerator(None)
    yield
    set_accelerator(None)


def test_detection_picks_cpu_without_devices() -> None:
    acc = get_accelerator()
    assert acc.device_name() == "cpu" and acc.communication_backend_name() == "gloo"
    assert get_accelerator() is acc  # cached


def test_shardwise_variable_wins_over_deepspeeds(monkeypatch) -> None:
    monkeypatch.setenv("SHARDWISE_ACCELERATOR", "cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "hpu")  # would fail if it were consulted
    assert get_accelerator().device_name() == "cpu"


def test_ds_accelerator_is_honoured(monkeypatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "CPU")
    assert get_accelerator().device_name() == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_requested_cuda_without_device_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("SHARDWISE_ACCELERATOR", "cuda")
    with pytest.raises(AcceleratorError, match=r"SHARDWISE_ACCELERATOR=cuda.*no CUDA device.*=cpu"):
        get_accelerator()


def test_requested_hpu_without_habana_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(accelerator.hpu, "habana_importable", lambda: False)
    monkeypatch.setenv("DS_ACCELERATOR", "hpu")
    with pytest.raises(AcceleratorError, match=r"DS_ACCELERATOR=hpu.*habana_frameworks is not installed"):
        get_accelerator()


def test_unknown_accelerator_names_the_choices(monkeypatch) -> None:
    monkeypatch.setenv("SHARDWISE_ACCELERATOR", "tpu")
    with pytest.raises(AcceleratorError, match=r"unknown accelerator 'tpu'.*cpu, cuda, hpu"):
        get_accelerator()


def test_cpu_accelerator_memory_statistics_track_the_process() -> None:
    acc = get_accelerator()
    acc.reset_peak_memory_stats()
    base = acc.memory_allocated()
    block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
    assert acc.max_memory_allocated() >= base + 60 * 2**20
    del block
    acc.empty_cache()
    acc.reset_peak_memory_stats()
    assert acc.max_memory_allocated() < base + 32 * 2**20
    assert not acc.supports_graph_capture()
    with pytest.raises(RuntimeError, match="graph capture is not available on the cpu accelerator"):
        acc.create_graph()


def test_set_accelerator_by_name() -> None:
    assert set_accelerator("cpu").device_name() == "cpu"


def test_report_lists_versions_and_backends() -> None:
    info = report.collect()
    assert info["torch"] == torch.__version__
    assert info["accelerator"] == "cpu" and info["backend gloo"] is True
    assert report.main([]) == 0
