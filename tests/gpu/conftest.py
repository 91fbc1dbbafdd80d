"""``tests/gpu``: marked ``gpu`` and skipped, not failed, where torch sees no CUDA device (CI, this CPU machine).

The collection hook below marks every test of this folder; without a device it adds one skip with the reason, so a
CPU run reports "skipped: no CUDA device" and never imports CUDA state. ``SHARDWISE_GPU_TESTS_ON_CPU=1`` rehearses
the device-independent tests on the cpu accelerator (see ``harness.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gpu.harness import ACCELERATOR, REHEARSAL

_HERE = Path(__file__).resolve().parent
_NEEDS_CUDA = "cuda_only"  # keyword of tests that measure what only a real device has (memory, pinning, graphs)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    present = torch.cuda.is_available()
    for item in items:
        if _HERE not in Path(str(item.fspath)).resolve().parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if REHEARSAL:
            if item.get_closest_marker(_NEEDS_CUDA):
                item.add_marker(pytest.mark.skip(reason="measures a CUDA device; not rehearsed on the cpu"))
        elif not present:
            item.add_marker(pytest.mark.skip(reason=f"no CUDA device (torch {torch.__version__}, "
                                                    f"built with CUDA {torch.version.cuda})"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{_NEEDS_CUDA}: measures something only a CUDA device has (tests/gpu)")


@pytest.fixture
def accelerator():
    """The accelerator of this run (cuda; cpu when rehearsing), set for the test and forgotten after it."""
    from shardwise.accelerator import set_accelerator

    acc = set_accelerator(ACCELERATOR)
    yield acc
    set_accelerator(None)


@pytest.fixture
def device(accelerator) -> torch.device:
    """The device the tests compute on."""
    return accelerator.device()
