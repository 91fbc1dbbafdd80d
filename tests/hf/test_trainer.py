"""The real transformers Trainer on shardwise, reached as DeepSpeed (``shardwise --num_gpus 2 train.py
--deepspeed cfg.json``, script unchanged): losses equal a single-process plain-PyTorch Trainer run of the same
global batch (fp32), with ZeRO-2 and ZeRO-3, DeepSpeed's optimizer or Trainer's, gradient accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hf.conftest import ds_config, run_script

pytestmark = pytest.mark.slow

OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def test_trainer_zero2_deepspeed_optimizer_matches_single_process(tiny_llama: str, tmp_path: Path) -> None:
    ref = run_script("trainer_run.py", ["--model", tiny_llama, "--out", str(tmp_path / "ref"), "--batch", "4"],
                     tmp_path, ranks=None)
    z2 = run_script("trainer_run.py", ["--model", tiny_llama, "--out", str(tmp_path / "z2"), "--batch", "2"],
                    tmp_path, config=ds_config(2, optimizer=OPTIMIZER))
    assert z2["world"] == 2 and ref["world"] == 1
    assert len(ref["losses"]) == 4 and _close(z2["losses"], ref["losses"]), (z2["losses"], ref["losses"])
    assert z2["trainable"] == ref["trainable"]
