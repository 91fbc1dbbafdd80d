"""Every corpus config that uses curriculum learning or random-LTD and loads (tests/unit/test_config_corpus.py) trains
an optimizer step on 2 ranks (1 for the file written for one rank) with a tiny layered model: the 10 ``data_efficiency``
files DeepSpeed 0.19.8 accepts, the one-rank CIFAR file, and the 5 legacy ``curriculum_learning`` files.

Templates are rendered as their launch scripts would (Megatron-DeepSpeed's: metric 1 ``seqlen_truncate``, metric 2
a vocabulary-rarity percentile read from index files written here); each run checks the first step's difficulty,
kept-token count and that the weights moved.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

import shardwise
from shardwise.data import convert_to_random_ltd, write_metric_index
from tests.data_models import TinyBlock, TinyLM, TokenPairs
from tests.dist import run_ranks
from tests.unit.test_config_corpus import DATA, EXPECTED, INDEX, PLACEHOLDERS, ZERO_STAGE

SEQ = 40
SAMPLES = 200  # percentile metrics out of 100 need at least 100 samples
# the values Megatron-DeepSpeed's example scripts substitute (bare placeholders; quoted ones in _QUOTED)
TRAIN_VALUES = {"CL_1st_MIN": "24", "CL_1st_MAX": "40", "CL_1st_TOTAL_STEP": "100", "CL_1st_DIFF_STEP": "8",
                "CL_1st_ROOT": "2", "CL_2nd_MIN": "50", "CL_2nd_MAX": "100", "CL_2nd_TOTAL_STEP": "100",
                "CL_2nd_DIFF_STEP": "1", "CL_2nd_ROOT": "2", "LTD_MIN": "16", "LTD_MAX": "40", "LTD_STEP": "100",
                "CONFIG_CL_MIN": "8", "CONFIG_CL_MAX": "32", "CONFIG_CL_DURATION": "100",
                "DATA_SAMPLING_NUM_WORKERS": "0", "DATA_EFFICIENCY_SEED": "1234", "CONFIG_BF16_ENABLED": "false"}


def _quoted(index_prefix: str) -> dict[str, str]:
    return {"CL_1st_METRIC_NAME": "seqlen_truncate", "CL_1st_DIFF_TYPE": "value",
            "CL_1st_CLUSTER_TYPE": "single_cluster", "CL_1st_SAMPLE_PATH": "dummy", "CL_1st_METRIC_PATH": "dummy",
            "CL_2nd_METRIC_NAME": "vocab_rarity", "CL_2nd_DIFF_TYPE": "percentile",
            "CL_2nd_CLUSTER_TYPE": "schedule_based", "CL_2nd_SAMPLE_PATH": f"{index_prefix}_index_to_sample",
            "CL_2nd_METRIC_PATH": f"{index_prefix}_index_to_metric", "CL_CLUSTER_PATH": f"{index_prefix}_clusters"}


def _render_for_training(entry: dict, index_prefix: str) -> dict:
    text = (DATA / entry["file"]).read_text()
    for name in entry["placeholders"]:
        value = TRAIN_VALUES.get(name) or (ZERO_STAGE.get(entry["file"], "1") if name == "ZERO_STAGE" else
                                           PLACEHOLDERS.get(name, "true" if name.endswith("ENABLED") else "8"))
        text = re.sub(r"([:\[,]\s*)" + re.escape(name) + r"\b", lambda m, v=value: m.group(1) + v, text)
    for name, value in _quoted(index_prefix).items():
        text = text.replace(f'"{name}"', json.dumps(value))
    return json.loads(text)


def _files() -> list[dict]:
    out = []
    for entry in INDEX:
        if EXPECTED[entry["file"]][1] != "ok":
            continue
        text = (DATA / entry["file"]).read_text()
        if '"data_efficiency"' in text or '"curriculum_learning"' in text:
            out.append(entry)
    return out


def _train_one_step(cfg: dict) -> dict:
    de = cfg.get("data_efficiency", {})
    ltd = de.get("data_routing", {}).get("random_ltd", {})
    curriculum = de.get("data_sampling", {}).get("curriculum_learning", {}).get("enabled", False)
    model = TinyLM(layers=ltd.get("total_layer_num", 4) if ltd.get("enabled") else 4, seq_first=ltd.get(
        "hidden_state_order") == "seq_batch_dim", pass_mask=bool(ltd.get("model_mask_name")), seed=0)
    before = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    optimizer = None if "optimizer" in cfg else torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = TokenPairs(SAMPLES, seq=SEQ) if curriculum else None
    engine, _, loader, _ = shardwise.initialize(model=model, optimizer=optimizer, config=cfg, training_data=data)
    if ltd.get("enabled"):
        convert_to_random_ltd(engine, TinyBlock)
    rank, gas = engine.topology.coord("dp"), engine.gradient_accumulation_steps()
    micro, widths, losses = engine.train_micro_batch_size_per_gpu(), [], []
    pairs = TokenPairs(micro * gas * engine.dp_world_size, seq=SEQ)
    for m in range(gas):
        if loader is not None:
            x, y = next(loader)
        else:
            i = (rank * gas + m) * micro
            x, y = pairs.data[i:i + micro, :-1], pairs.data[i:i + micro, 1:]
        widths.append(x.shape[1])
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    moved = max((v.float() - before[k.replace(".random_ltd_layer", "")]).abs().max().item()
                for k, v in engine.module.state_dict().items())
    sched = engine.random_ltd_scheduler
    return {"steps": engine.global_steps, "skipped": engine.skipped_steps, "losses": losses, "moved": moved,
            "widths": widths, "seen": list(model.seen_lengths),
            "kept": sched.get_current_seq() if sched is not None else None,
            "dropped_shape": tuple(sched.state["sample_idx"].shape) if sched is not None and
            "sample_idx" in sched.state else None}


@pytest.mark.parametrize("entry", _files(), ids=lambda e: e["file"][:70])
def test_corpus_config_trains_a_step(entry: dict, tmp_path) -> None:
    prefix = str(tmp_path / "voc")
    write_metric_index(prefix, np.arange(SAMPLES) % 7)  # a vocabulary-rarity stand-in: 7 rarity levels
    cfg = _render_for_training(entry, prefix)
    dp = EXPECTED[entry["file"]][0]
    results = run_ranks(_train_one_step, cfg, world_size=dp, timeout=120)
    de = cfg.get("data_efficiency", {})
    ltd = de.get("data_routing", {}).get("random_ltd", {})
    metrics = de.get("data_sampling", {}).get("curriculum_learning", {}).get("curriculum_metrics", {})
    for res in results:
        assert res["steps"] == 1 and res["skipped"] == 0 and all(math.isfinite(v) for v in res["losses"])
        assert res["moved"] > 0
        if "seqlen_truncate" in metrics:  # fixed_root 24 -> 40 in steps of 8: sqrt(1/100) * 16 + 24 = 25.6 -> 24
            assert set(res["widths"]) == {24}
        elif cfg.get("curriculum_learning", {}).get("enabled"):  # legacy: forward gets curriculum_seqlen = 8
            assert set(res["seen"]) == {8} and set(res["widths"]) == {SEQ}
        if ltd.get("enabled"):
            kept = ltd["random_ltd_schedule"]["min_value"]  # step 0 of fixed_linear: the minimum
            assert res["kept"] == kept
            width = min(res["widths"])
            if kept < width:
                assert res["dropped_shape"][0] == ltd["random_ltd_layer_num"] and res["dropped_shape"][2] == kept
