"""Curriculum learning, single process: schedule values per step against hand-computed tables, the sampler's
batches (clusters, per-rank slices, resumption), the index files, and seqlen truncation of every batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from shardwise.config import ConfigError, load_config
from shardwise.data import CurriculumDataLoader, CurriculumScheduler, DataSampler, IndexedRows, truncate_batch
from shardwise.data.indexed import IndexFormatError, write_metric_index, write_rows


def _sched(kind: str, **sc) -> CurriculumScheduler:
    return CurriculumScheduler({"min_difficulty": 8, "max_difficulty": 64, "schedule_type": kind,
                                "schedule_config": sc})


def _run(s: CurriculumScheduler, steps: range) -> list:
    return [s.update_difficulty(step) for step in steps]


def test_fixed_linear_matches_hand_computed_values():
    # floor(s/10 * 56 + 8), rounded down to a multiple of 8: 13.6->8, 19.2->16, 24.8->24, 30.4->24, 36->32, ...
    s = _sched("fixed_linear", total_curriculum_step=10, difficulty_step=8)
    assert _run(s, range(1, 13)) == [8, 16, 24, 24, 32, 40, 40, 48, 56, 64, 64, 64]


def test_fixed_root_matches_hand_computed_values():
    # sqrt(s/100) * 56 + 8: s=1 -> 13.6 -> 8; s=4 -> 19.2 -> 16; s=25 -> 36 -> 32; s=49 -> 47.2 -> 40;
    # s=81 -> 58.4 -> 56; s=100 -> 64
    s = _sched("fixed_root", total_curriculum_step=100, difficulty_step=8, root_degree=2)
    assert [s.get_difficulty(step) for step in (1, 4, 25, 49, 81, 100, 150)] == [8, 16, 32, 40, 56, 64, 64]


def test_fixed_discrete_matches_hand_computed_values():
    s = CurriculumScheduler({"min_difficulty": 1, "max_difficulty": 3, "schedule_type": "fixed_discrete",
                             "schedule_config": {"difficulty": [1, 2, 3], "max_step": [5, 10]}})
    assert _run(s, range(1, 14)) == [1] * 5 + [2] * 5 + [3] * 3


def test_custom_schedule_and_the_maximum_is_final():
    s = CurriculumScheduler({"min_difficulty": 0, "max_difficulty": 10, "schedule_type": "custom"})
    with pytest.raises(RuntimeError, match="set_custom_curriculum_learning_schedule"):
        s.update_difficulty(1)
    s.set_custom_get_difficulty(lambda step: 10 - abs(step - 5) * 2)  # up to the maximum at step 5, then down
    assert _run(s, range(1, 9)) == [2, 4, 6, 8, 10, 10, 10, 10]  # once at the maximum it stays there


def test_scheduler_state_round_trips_and_errors_name_the_key():
    s = _sched("fixed_linear", total_curriculum_step=10, difficulty_step=8)
    s.update_difficulty(5)
    t = _sched("fixed_linear", total_curriculum_step=10, difficulty_step=8)
    t.set_state(dict(s.get_state()))
    assert t.get_current_difficulty() == 32 and _run(t, range(6, 8)) == _run(s, range(6, 8))
    with pytest.raises(ValueError, match="root_degree"):
        _sched("fixed_root", total_curriculum_step=10, difficulty_step=8)
    with pytest.raises(ValueError, match="min_difficulty"):
        CurriculumScheduler({"max_difficulty": 1, "schedule_type": "custom"})


# -- config ---------------------------------------------------------------------------------------------------------
def _de(metrics: dict, seed: int = 7, epochs: int = 1000) -> dict:
    return {"enabled": True, "seed": seed, "data_sampling": {
        "enabled": True, "num_epochs": epochs,
        "curriculum_learning": {"enabled": True, "curriculum_metrics": metrics}}}


SEQLEN = {"seqlen_truncate": {"difficulty_type": "value", "clustering_type": "single_cluster", "min_difficulty": 4,
                              "max_difficulty": 16, "schedule_type": "fixed_linear",
                              "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 4}}}


def _cfg(metrics: dict, micro: int = 2, gas: int = 1, dp: int = 1, **kw):
    return load_config({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
                        "data_efficiency": _de(metrics, **kw)}, dp_world_size=dp, log=False)


def test_config_checks_schedule_requirements_at_load():
    bad = {"m": {**SEQLEN["seqlen_truncate"], "schedule_type": "fixed_root"}}
    with pytest.raises(ConfigError) as info:
        _cfg(bad)
    assert info.value.path.endswith("curriculum_metrics.m.schedule_config.root_degree")
    with pytest.raises(ConfigError, match="fixed_discrete needs one more difficulty"):
        _cfg({"m": {**SEQLEN["seqlen_truncate"], "schedule_type": "fixed_discrete",
                    "schedule_config": {"difficulty": [1, 2], "max_step": [1, 2]}}})
    with pytest.raises(ConfigError, match="did you mean 'min_difficulty'"):
        _cfg({"m": {**SEQLEN["seqlen_truncate"], "min_dificulty": 2}})
    with pytest.raises(ConfigError, match="curriculum_metrics: missing or empty"):
        _cfg({})
    with pytest.raises(ConfigError, match="dynamic_batching"):
        load_config({"train_batch_size": 2, "data_efficiency": {"data_sampling": {"dynamic_batching": {
            "enabled": True, "max_tokens": 10}}}})


def test_placeholder_strings_are_refused_when_the_sampler_is_built():
    cfg = _cfg({"m": {**SEQLEN["seqlen_truncate"], "difficulty_type": "CL_1st_DIFF_TYPE"}})  # loads, as DeepSpeed
    with pytest.raises(ValueError, match=r"curriculum_metrics\.m\.difficulty_type = 'CL_1st_DIFF_TYPE'"):
        DataSampler(cfg.data_efficiency, 10, 2, 0, 1, 1)


# -- sampler --------------------------------------------------------------------------------------------------------
def _take(sampler: DataSampler, n: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_single_cluster_draws_every_sample_once_per_pass():
    cfg = _cfg(SEQLEN, micro=4, gas=2)  # global batch of 8
    sampler = DataSampler(cfg.data_efficiency, 24, 4, 0, 1, 2)
    first_pass = sum(_take(sampler, 6), [])  # 6 micro-batches = 24 samples = one pass over the single cluster
    assert sorted(first_pass) == list(range(24))
    assert sampler.curriculum_step == 3 and sampler.current_difficulties == {"seqlen_truncate": 8}


def test_ranks_get_contiguous_slices_of_the_same_global_batch():
    cfg = _cfg(SEQLEN, micro=2, gas=2, dp=2)
    ranks = [_take(DataSampler(cfg.data_efficiency, 40, 2, r, 2, 2), 4) for r in range(2)]
    whole = DataSampler(cfg.data_efficiency, 40, 4, 0, 1, 2)  # one rank drawing both ranks' micro-batches
    for micro, together in enumerate(_take(whole, 4)):
        assert ranks[0][micro] + ranks[1][micro] == together


def _value_metric(tmp_path, values, **sched) -> dict:
    to_sample, to_metric = write_metric_index(tmp_path / "m", np.array(values))
    return {"difficulty_type": "value", "clustering_type": "schedule_based", "index_to_sample_path": to_sample,
            "index_to_metric_path": to_metric, **sched}


def test_value_metric_admits_samples_as_difficulty_grows(tmp_path):
    values = [i // 4 for i in range(16)]  # samples 0-3 have difficulty 0, 4-7 have 1, 8-15 have 2 and 3
    metric = _value_metric(tmp_path, values, min_difficulty=0, max_difficulty=3, schedule_type="fixed_discrete",
                           schedule_config={"difficulty": [0, 1, 3], "max_step": [1, 2]})
    cfg = _cfg({"rarity": metric}, micro=4)
    sampler = DataSampler(cfg.data_efficiency, 16, 4, 0, 1, 1)  # global batches of 4
    step1 = _take(sampler, 1)[0]
    assert sorted(step1) == [0, 1, 2, 3]  # the only admitted cluster holds exactly one global batch of samples
    step2 = _take(sampler, 1)[0]
    assert set(step2) <= set(range(8)) and [len(c) for c in sampler.clusters] == [4, 4]
    step3 = _take(sampler, 1)[0]
    assert set(step3) <= set(range(16)) and sorted(np.concatenate(sampler.clusters)) == list(range(16))


def test_percentile_metric_and_two_metrics_intersect(tmp_path):
    to_sample, _ = write_metric_index(tmp_path / "p", np.arange(20) % 10)  # rows by value: (0, 10), (1, 11), ...
    pct = {"difficulty_type": "percentile", "clustering_type": "schedule_based", "index_to_sample_path": to_sample,
           "min_difficulty": 5, "max_difficulty": 10, "schedule_type": "fixed_discrete",
           "schedule_config": {"difficulty": [5, 10], "max_step": [1]}}  # percentiles out of 10: 2 samples each
    sampler = DataSampler(_cfg({"p": pct}, micro=10).data_efficiency, 20, 10, 0, 1, 1)
    assert sorted(_take(sampler, 1)[0]) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]  # the lower half by metric value
    values = _value_metric(tmp_path, [i % 2 for i in range(20)], min_difficulty=0, max_difficulty=1,
                           schedule_type="fixed_discrete", schedule_config={"difficulty": [0, 1], "max_step": [1]})
    both = DataSampler(_cfg({"p": pct, "v": values}, micro=6).data_efficiency, 20, 6, 0, 1, 1)
    assert sorted(_take(both, 1)[0]) == [0, 2, 4, 10, 12, 14]  # lower half by percentile AND even


def test_sampler_resumes_from_its_state_dict(tmp_path):
    metric = _value_metric(tmp_path, [i % 3 for i in range(30)], min_difficulty=0, max_difficulty=2,
                           schedule_type="fixed_linear", schedule_config={"total_curriculum_step": 4,
                                                                          "difficulty_step": 1})
    cfg = _cfg({"m": metric, **SEQLEN}, micro=3, gas=2)
    a = DataSampler(cfg.data_efficiency, 30, 3, 0, 1, 2)
    _take(a, 5)
    b = DataSampler(cfg.data_efficiency, 30, 3, 0, 1, 2)
    b.load_state_dict(a.state_dict())
    assert _take(b, 12) == _take(a, 12)


def test_index_files_round_trip_and_bad_files_are_named(tmp_path):
    rows = [[3, 1], [], [7, 8, 9]]
    write_rows(tmp_path / "r", rows, np.uint16)
    read = IndexedRows(tmp_path / "r")
    assert [list(read[i]) for i in range(len(read))] == rows and read.dtype == np.uint16
    (tmp_path / "bad.idx").write_bytes(b"not an index")
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(IndexFormatError, match="bad.idx"):
        IndexedRows(tmp_path / "bad")
    with pytest.raises(IndexFormatError, match="missing.idx does not exist"):
        IndexedRows(tmp_path / "missing")


# -- truncation -------------------------------------------------------------------------------------------------------
class Tokens(Dataset):
    """Sample i: ids ``i*100 + [0, 1, ..., 15]`` and the same as labels, plus a per-sample scalar."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        ids = torch.arange(16) + 100 * i
        return {"input_ids": ids, "labels": ids.clone(), "index": torch.tensor(i)}


def test_truncate_batch_cuts_dimension_one_only():
    batch = {"ids": torch.zeros(2, 10), "emb": torch.zeros(2, 10, 3), "n": torch.zeros(2), "pair": (torch.ones(2, 4),)}
    out = truncate_batch(batch, 6)
    assert out["ids"].shape == (2, 6) and out["emb"].shape == (2, 6, 3) and out["n"].shape == (2,)
    assert out["pair"][0].shape == (2, 4)


def test_loader_truncates_every_batch_to_the_difficulty_of_its_global_batch():
    cfg = _cfg(SEQLEN, micro=2, gas=2)
    loader = CurriculumDataLoader(Tokens(), DataSampler(cfg.data_efficiency, 64, 2, 0, 1, 2))
    # fixed_linear 4 -> 16 over 6 steps, multiples of 4: floor(s/6*12 + 4) = 6, 8, 10, 12, 14, 16 -> 4, 8, 8, 12,
    # 12, 16, 16 for global batches 1..7, each of two micro-batches
    expected = [4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 16, 16, 16, 16]
    got = [next(loader) for _ in range(14)]
    assert [b["input_ids"].shape[1] for b in got] == expected
    for b in got:
        ids = b["index"][:, None] * 100 + torch.arange(b["input_ids"].shape[1])
        assert torch.equal(b["input_ids"], ids) and torch.equal(b["labels"], ids)  # the leading positions


def test_post_process_func_replaces_the_builtin_truncation():
    cfg = _cfg(SEQLEN, micro=2)
    loader = CurriculumDataLoader(Tokens(), DataSampler(cfg.data_efficiency, 64, 2, 0, 1, 1))
    seen = []

    def post(batch, state):
        seen.append(state["current_difficulties"]["seqlen_truncate"])
        return batch["input_ids"][:, : state["current_difficulties"]["seqlen_truncate"] + 1]

    loader.post_process_func = post
    assert [next(loader).shape[1] for _ in range(3)] == [5, 9, 9] and seen == [4, 8, 8]


def test_random_ltd_config_requirements():
    block = {"enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 2, "random_ltd_layer_id": [1, 2],
             "model_mask_name": None, "model_type": "decoder", "hidden_state_order": "batch_seq_dim",
             "micro_batch_size": 2,  # DeepSpeed writes the batch sizes here itself; accepted, the engine's win
             "random_ltd_schedule": {"min_value": 8, "max_value": 64, "schedule_type": "fixed_linear",
                                     "schedule_config": {"require_steps": 100, "seq_per_step": 16}}}

    def load(**over):
        return load_config({"train_batch_size": 2, "data_efficiency": {"data_routing": {"random_ltd": {
            **block, **over}}}}, log=False)

    with pytest.raises(ConfigError, match=r"min_value 8 < schedule_config.seq_per_step 16.*Fix: set min_value >= 16"):
        load()  # DeepSpeed 0.19.8 rounds the first kept count down to 0 tokens and fails inside the model
    assert load(random_ltd_schedule={**block["random_ltd_schedule"], "min_value": 16}).data_efficiency
    with pytest.raises(ConfigError, match="random_ltd_layer_num = 3 but random_ltd_layer_id lists 2"):
        load(random_ltd_layer_num=3, random_ltd_schedule={**block["random_ltd_schedule"], "min_value": 16})
    with pytest.raises(ConfigError, match="layer_token_lr_schedule"):
        load(layer_token_lr_schedule={"enabled": True}, random_ltd_schedule={**block["random_ltd_schedule"],
                                                                             "min_value": 16})
