"""Tensor and sequence parallelism through the real transformers Trainer and Accelerate on shardwise, reached as
DeepSpeed with the script unchanged (``shardwise --num_gpus 2 train.py --deepspeed cfg.json``):

* AutoTP: ``"tensor_parallel": {"autotp_size": 2}`` in the DeepSpeed config (Trainer calls ``deepspeed.tp_model_init``,
  accelerate gives both tensor ranks the same batch). With 2 ranks the data-parallel size is 1, so the losses equal
  one process training on one rank's batch; ``save_model()`` writes full HF weights (gathered over the tensor ranks)
  equal to that run's trained weights.
* Ulysses: accelerate's ``ParallelismConfig(sp_size=2, sp_backend="deepspeed")`` as ``TrainingArguments.
  parallelism_config`` (``UlyssesSPAttentionHF.register_with_transformers``, ``deepspeed_ulysses_dl_adapter``, the
  token-weighted loss over the sequence group). Each rank's model sees half of every sequence; the losses and
  gradient norms equal one process on the full sequences, under ZeRO-2 and ZeRO-3, with ignored (-100) labels.
* Both at once is refused with an error naming both settings and the fix.
* Accelerate's own loop (``prepare(model, optimizer, dataloader)``) with either, ``get_state_dict`` gathering.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf.conftest import SCRIPTS, ds_config, hf_env, run_script

pytestmark = pytest.mark.slow


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) > 0 and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _tp_config(stage: int) -> dict:
    cfg = ds_config(stage, tensor_parallel={"autotp_size": 2})
    cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True  # save_model gathers (DeepSpeed)
    return cfg


@pytest.fixture(scope="module")
def reference(tiny_llama: str, tmp_path_factory) -> tuple[dict, Path]:
    """One process, no DeepSpeed: batch 2 per step (one rank's batch = the global batch at data-parallel size 1)."""
    tmp = tmp_path_factory.mktemp("tp_reference")
    out = tmp / "ref"
    result = run_script("trainer_tp_sp.py", ["--model", tiny_llama, "--out", str(out), "--batch", "2",
                                             "--save_model"], tmp, ranks=None)
    assert result["world"] == 1 and len(result["losses"]) == 4
    return result, out


@pytest.mark.parametrize("stage", [1, 2])
def test_trainer_autotp_matches_single_process_and_saves_full_weights(stage: int, tiny_llama: str, reference,
                                                                      tmp_path: Path) -> None:
    ref, ref_out = reference
    out = tmp_path / f"tp_z{stage}"
    got = run_script("trainer_tp_sp.py", ["--model", tiny_llama, "--out", str(out), "--batch", "2", "--save_model"],
                     tmp_path, config=_tp_config(stage))
    assert (got["world"], got["tp"], got["total_batch"]) == (2, 2, 2)
    assert _close(got["losses"], ref["losses"]), (got["losses"], ref["losses"])
    assert _close(got["norms"], ref["norms"]), (got["norms"], ref["norms"])
    saved, expected = _weights(out / "final"), _weights(ref_out / "final")
    assert sorted(saved) == sorted(expected)
    for name, value in expected.items():  # full (gathered) shapes, the trained values
        assert saved[name].shape == value.shape and (saved[name] - value).abs().max() < 1e-5, name


@pytest.fixture(scope="module")
def sp_reference(tiny_llama: str, tmp_path_factory) -> dict:
    """One process on the full sequences; the last 6 of 16 labels are -100 (so the shards hold unequal targets)."""
    tmp = tmp_path_factory.mktemp("sp_reference")
    return run_script("trainer_tp_sp.py", ["--model", tiny_llama, "--out", str(tmp / "ref"), "--batch", "2",
                                           "--pad_tail", "6"], tmp, ranks=None)


@pytest.mark.parametrize("stage", [2, 3])
def test_trainer_ulysses_matches_single_process_on_full_sequences(stage: int, tiny_llama: str, sp_reference,
                                                                   tmp_path: Path) -> None:
    got = run_script("trainer_tp_sp.py", ["--model", tiny_llama, "--out", str(tmp_path / f"sp_z{stage}"), "--batch",
                                          "2", "--pad_tail", "6", "--sp", "2"], tmp_path, config=ds_config(stage))
    assert (got["world"], got["sp"], got["total_batch"]) == (2, 2, 2)
    assert got["seen_lengths"] == [8], "the model did not run on sequence shards"
    assert _close(got["losses"], sp_reference["losses"]), (got["losses"], sp_reference["losses"])
    assert _close(got["norms"], sp_reference["norms"]), (got["norms"], sp_reference["norms"])


def test_trainer_autotp_with_ulysses_is_refused_clearly(tiny_llama: str, tmp_path: Path) -> None:
    cfg_path = tmp_path / "ds.json"
    cfg_path.write_text(json.dumps(_tp_config(1)))
    cmd = [sys.executable, "-m", "shardwise.launcher.cli", "--num_gpus", "2", str(SCRIPTS / "trainer_tp_sp.py"),
           "--model", tiny_llama, "--out", str(tmp_path / "both"), "--sp", "2", "--deepspeed", str(cfg_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=hf_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "tensor_parallel.autotp_size" in text and "sp_size" in text and "Fix:" in text, text[-4000:]


# -- Accelerate's own loop: prepare(model, optimizer, dataloader) --------------------------------------------------
def _acc_config(stage: int, tp: int = 1) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage,
                                                          "stage3_gather_16bit_weights_on_model_save": True}}
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp}
    return cfg


@pytest.fixture(scope="module")
def acc_reference(tiny_llama: str, tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("acc_tp_sp_ref")
    out = tmp / "ref"
    out.mkdir()
    return run_script("accelerate_tp_sp.py", ["--model", tiny_llama, "--out", str(out)], tmp, ranks=None), out


@pytest.mark.parametrize("mode", ["tp", "sp"])
def test_accelerate_loop_autotp_and_ulysses_match_single_process(mode: str, tiny_llama: str, acc_reference,
                                                                 tmp_path: Path) -> None:
    """AutoTP from the config (``initialize`` splits the model; the AdamW made before ``prepare`` keeps training
    the split parameters) and Ulysses from ``ParallelismConfig`` (``prepare`` wraps the data loader): losses, norms
    and ``get_state_dict`` (gathered full weights) equal one process."""
    import torch

    ref, ref_out = acc_reference
    out = tmp_path / mode
    out.mkdir()
    args = ["--model", tiny_llama, "--out", str(out)] + (["--sp", "2"] if mode == "sp" else [])
    got = run_script("accelerate_tp_sp.py", args, tmp_path, config=_acc_config(1 if mode == "tp" else 2,
                                                                               tp=2 if mode == "tp" else 1))
    assert got["world"] == 2 and got["seen_lengths"] == ([8] if mode == "sp" else [16])
    assert _close(got["losses"], ref["losses"]), (got["losses"], ref["losses"])
    assert _close(got["norms"], ref["norms"]), (got["norms"], ref["norms"])
    state = torch.load(out / "state_dict.pt", weights_only=True)
    expected = torch.load(ref_out / "state_dict.pt", weights_only=True)
    assert sorted(state) == sorted(expected)
    for name, value in expected.items():
        assert state[name].shape == value.shape and (state[name] - value).abs().max() < 1e-5, name
