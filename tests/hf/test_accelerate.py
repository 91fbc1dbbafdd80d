"""An Accelerate custom loop on shardwise as DeepSpeed (``shardwise --num_gpus 2 loop.py``, accelerate's own
DeepSpeed plugin, script unchanged): ``prepare``, ``backward``, ``clip_grad_norm_`` (the engine's global norm),
``save_state`` / ``load_state`` (the steps after a reload repeat exactly), ``get_state_dict`` (full weights equal
to the single-process run's) under ZeRO-2 and ZeRO-3, losses equal to one process on the same global batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.hf.conftest import run_script

pytestmark = pytest.mark.slow


def _config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "steps_per_print": float("inf"),
            "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}}


@pytest.fixture(scope="module")
def reference(tiny_llama: str, tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("acc_ref")
    out = tmp / "ref"
    out.mkdir()
    return run_script("accelerate_loop.py", ["--model", tiny_llama, "--out", str(out), "--batch", "4"], tmp,
                      ranks=None), out


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_loop_matches_single_process(stage: int, tiny_llama: str, reference, tmp_path: Path) -> None:
    ref, ref_out = reference
    out = tmp_path / f"z{stage}"
    out.mkdir()
    got = run_script("accelerate_loop.py", ["--model", tiny_llama, "--out", str(out), "--batch", "2"], tmp_path,
                     config=_config(stage))
    assert got["world"] == 2 and len(got["losses"]) == 6
    assert got["engine"] == "shardwise.engine.engine.Engine", got["engine"]  # the DeepSpeed engine, not DDP
    for key in ("losses", "norms"):
        assert all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(got[key], ref[key])), (key, got, ref)
    assert got["losses"][2:4] == got["losses"][4:6], "steps after load_state differ from the first time"
    assert got["skipped"] == [False] * 6
    state = torch.load(out / "state_dict.pt", weights_only=True)
    expected = torch.load(ref_out / "state_dict.pt", weights_only=True)
    assert sorted(state) == sorted(expected)
    for name, value in expected.items():
        assert state[name].shape == value.shape and (state[name] - value).abs().max() < 1e-5, name
