"""Helpers for the Hugging Face integration tests: a tiny random Llama saved locally (no hub), DeepSpeed configs
in the style of the HF docs ("auto" values), and runs of unchanged HF scripts through the shardwise launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).parent / "scripts"


def ds_config(stage: int, **extra: object) -> dict:
    """A DeepSpeed config as the HF docs write it: every size "auto" (Trainer fills them in)."""
    cfg = {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage}, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
    }
    if stage == 3:
        cfg["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True,
                                         "stage3_param_persistence_threshold": "auto",
                                         "stage3_prefetch_bucket_size": "auto", "reduce_bucket_size": "auto"})
    cfg.update(extra)
    return cfg


def save_tiny_llama(path: str) -> str:
    """Save a 2-layer random LlamaForCausalLM (seed 0) as safetensors under ``path``; returns ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """The tiny Llama of :func:`save_tiny_llama`, saved once per session; its path."""
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


def hf_env() -> dict[str, str]:
    """The environment the HF scripts run in: CPU, one thread per rank, offline, this checkout first."""
    env = dict(os.environ)
    for name in ("CUDA_VISIBLE_DEVICES", "DS_ENV_FILE", "SHARDWISE_ENV_FILE", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                 "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SHARDWISE_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONPATH=str(ROOT))
    return env


def run_script(script: str, args: list[str], tmp: Path, ranks: int | None = 2, config: dict | None = None,
               timeout: float = 400) -> dict:
    """Run ``scripts/<script>`` through ``shardwise --num_gpus ranks`` (or plainly, ``ranks=None``) with
    ``--deepspeed <config>`` when given; returns the JSON rank 0 wrote to ``<--out>/result.json``."""
    out = Path(args[args.index("--out") + 1])
    argv = [str(SCRIPTS / script), *args]
    if config is not None:
        cfg_path = tmp / f"ds_{out.name}.json"
        cfg_path.write_text(json.dumps(config))
        argv += ["--deepspeed", str(cfg_path)]
    cmd = [sys.executable, *argv] if ranks is None else \
        [sys.executable, "-m", "shardwise.launcher.cli", "--num_gpus", str(ranks), *argv]
    proc = subprocess.run(cmd, cwd=tmp, env=hf_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    return json.loads((out / "result.json").read_text())
