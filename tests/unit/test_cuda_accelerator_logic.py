"""The cuda accelerator's own logic, checked without a GPU (torch.cuda's answers stubbed): the device-index check
of ``set_device`` and the device ``total_memory`` reads. The real device is exercised in ``tests/gpu``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from shardwise.accelerator import AcceleratorError
from shardwise.accelerator.cuda import CudaAccelerator


def test_set_device_beyond_the_visible_devices_names_the_cause(monkeypatch) -> None:
    bound = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    acc = CudaAccelerator()
    acc.set_device(1)
    assert bound == [1]
    for bad in (2, -1):
        with pytest.raises(AcceleratorError, match=r"cuda device index -?\d asked for, but 2 device\(s\) are visible "
                                                   r"\(CUDA_VISIBLE_DEVICES=4,5\).*LOCAL_RANK"):
            acc.set_device(bad)
    assert bound == [1]


def test_total_memory_reads_the_current_device_by_default(monkeypatch) -> None:
    sizes = {0: 80, 1: 141}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=sizes[i]))
    acc = CudaAccelerator()
    assert acc.total_memory() == 141  # the device this process uses, not device 0
    assert acc.total_memory(0) == 80
