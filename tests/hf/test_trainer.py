"""The real transformers Trainer on shardwise, reached as DeepSpeed (``shardwise --num_gpus 2 train.py
--deepspeed cfg.json``, script unchanged): losses equal a single-process plain-PyTorch Trainer run of the same
global batch (fp32), with ZeRO-2 (DeepSpeed's optimizer) and ZeRO-3 (Trainer's optimizer and scheduler, gradient
accumulation, ``from_pretrained`` through ``zero.Init``); ``save_model()`` writes the trained full weights; a run
resumed from a Trainer checkpoint continues with the uninterrupted run's losses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hf.conftest import ds_config, run_script

pytestmark = pytest.mark.slow

OPTIMIZER = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(1.0, abs(y)) for x, y in zip(a, b))


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tiny_llama: str, tmp_path_factory) -> tuple[dict, Path]:
    """One process, no DeepSpeed: batch 4 per step (the 2-rank runs' global batch), final weights saved."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "ref"
    result = run_script("trainer_run.py", ["--model", tiny_llama, "--out", str(out), "--batch", "4", "--save_model"],
                        tmp, ranks=None)
    assert result["world"] == 1 and len(result["losses"]) == 4
    return result, out


def test_trainer_zero2_deepspeed_optimizer_matches_single_process(tiny_llama: str, reference, tmp_path: Path) -> None:
    ref, _ = reference
    z2 = run_script("trainer_run.py", ["--model", tiny_llama, "--out", str(tmp_path / "z2"), "--batch", "2"],
                    tmp_path, config=ds_config(2, optimizer=OPTIMIZER))
    assert z2["world"] == 2
    assert _close(z2["losses"], ref["losses"]), (z2["losses"], ref["losses"])
    assert z2["trainable"] == ref["trainable"]


def test_trainer_zero3_accumulation_save_and_resume(tiny_llama: str, reference, tmp_path: Path) -> None:
    ref, ref_out = reference
    common = ["--model", tiny_llama, "--batch", "1", "--gas", "2"]
    z3 = run_script("trainer_run.py", [*common, "--out", str(tmp_path / "z3"), "--save_model", "--save_steps", "2"],
                    tmp_path, config=ds_config(3))
    assert _close(z3["losses"], ref["losses"]), (z3["losses"], ref["losses"])
    assert z3["zero_init"], "from_pretrained under ZeRO-3 did not build the parameters partitioned (zero.Init)"
    assert z3["loaded_numel"] == z3["trainable"] == ref["trainable"]
    # save_model(): full fp32 weights as safetensors, equal to the single-process run's trained weights
    saved, expected = _weights(tmp_path / "z3" / "final"), _weights(ref_out / "final")
    assert sorted(saved) == sorted(expected)
    for name, value in expected.items():
        assert saved[name].shape == value.shape and (saved[name] - value).abs().max() < 1e-5, name
    checkpoint = tmp_path / "z3" / "checkpoint-2"
    assert (checkpoint / "zero_to_fp32.py").is_file() and (checkpoint / "latest").is_file()
    resumed = run_script("trainer_run.py", [*common, "--out", str(tmp_path / "resumed"), "--resume",
                                            str(checkpoint)], tmp_path, config=ds_config(3))
    assert _close(resumed["losses"], z3["losses"][2:], tol=1e-6), (resumed["losses"], z3["losses"])


def test_peft_lora_on_zero3_trains_the_adapters_only(tiny_llama: str, tmp_path: Path) -> None:
    ref = run_script("trainer_run.py", ["--model", tiny_llama, "--out", str(tmp_path / "ref"), "--batch", "4",
                                        "--lora"], tmp_path, ranks=None)
    z3 = run_script("trainer_run.py", ["--model", tiny_llama, "--out", str(tmp_path / "z3"), "--batch", "2",
                                       "--lora"], tmp_path, config=ds_config(3))
    assert z3["zero_init"]
    # PEFT's own count (ds_numel of the partitioned base) and Trainer's: adapters trainable, base frozen
    assert z3["lora_counts"] == ref["lora_counts"] and ref["lora_counts"][0] < ref["lora_counts"][1]
    assert z3["trainable"] == ref["trainable"] == ref["lora_counts"][0] and z3["total"] == ref["total"]
    assert _close(z3["losses"], ref["losses"]), (z3["losses"], ref["losses"])


SCHEDULER = {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                            "warmup_num_steps": "auto", "warmup_type": "linear"}}


def test_trainer_zero3_cpu_offload_with_deepspeed_scheduler(tiny_llama: str, tmp_path: Path) -> None:
    ref = run_script("trainer_run.py", ["--model", tiny_llama, "--out", str(tmp_path / "ref"), "--batch", "4",
                                        "--ds_warmup_reference", "2"], tmp_path, ranks=None)
    cfg = ds_config(3, optimizer=OPTIMIZER, scheduler=SCHEDULER)
    cfg["zero_optimization"].update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    off = run_script("trainer_run.py", ["--model", tiny_llama, "--out", str(tmp_path / "off"), "--batch", "2",
                                        "--warmup_steps", "2"], tmp_path, config=cfg)
    assert off["zero_init"] and _close(off["losses"], ref["losses"]), (off["losses"], ref["losses"])


def test_trainer_bf16_auto_trains_close_to_fp32(tiny_llama: str, reference, tmp_path: Path) -> None:
    ref, _ = reference
    bf = run_script("trainer_run.py", ["--model", tiny_llama, "--out", str(tmp_path / "bf"), "--batch", "2",
                                       "--bf16"], tmp_path, config=ds_config(2))
    assert bf["world"] == 2 and _close(bf["losses"], ref["losses"], tol=5e-3), (bf["losses"], ref["losses"])
