"""The planner's pure parts: pipeline cost from the real schedules, hardware profiles, model presets, step-time
arithmetic, and the command's argument errors (none of these starts a process group)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from shardwise.pipe.schedule import bubble_fraction
from shardwise.plan import PRESETS, load_profile, resolve_model, sample_ranks
from shardwise.plan.cli import main
from shardwise.plan.hardware import ProfileError, known_profiles
from shardwise.plan.models import ModelSpecError, llama_from_hf
from shardwise.plan.pipeline import pipeline_cost
from shardwise.plan.step_time import estimate_step, model_flops_per_token


@pytest.mark.parametrize("p,m,v", [(2, 4, 1), (4, 16, 1), (8, 8, 1), (4, 8, 2)])
def test_pipeline_bubble_replayed_from_the_schedules_equals_the_closed_form(p: int, m: int, v: int) -> None:
    cost = pipeline_cost(p, m, v)
    assert cost.bubble == pytest.approx(bubble_fraction(p, m, v))
    if v == 1:
        assert cost.in_flight == [min(p - s, m) for s in range(p)]


def test_recompute_keeps_the_bubble_fraction_and_one_stage_has_none() -> None:
    assert pipeline_cost(4, 16, recompute=True).bubble == pytest.approx(bubble_fraction(4, 16))
    assert pipeline_cost(1, 8).bubble == 0.0 and pipeline_cost(1, 8).in_flight == [1]


def test_shipped_hardware_profiles_load_with_their_sources() -> None:
    assert {"h100-sxm", "gaudi2"} <= set(known_profiles())
    h100, gaudi = load_profile("h100-sxm"), load_profile("gaudi2")
    assert h100.device_memory == 80 * 2**30 and gaudi.device_memory == 96 * 2**30
    assert h100.intra_node.effective > h100.inter_node.effective and h100.sources and gaudi.sources
    with pytest.raises(ProfileError, match="h100-sxm"):
        load_profile("h100-sxn")


def test_a_profile_file_with_a_missing_field_names_it(tmp_path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "device_memory_gib": 40}))
    with pytest.raises(ProfileError, match="peak_flops"):
        load_profile(str(path))


def test_presets_have_their_published_parameter_counts() -> None:
    published = {"llama-7b": 6.74e9, "llama-70b": 68.98e9, "llama3-8b": 8.03e9, "llama-405b": 405.85e9}
    for name, count in published.items():
        assert resolve_model(name).parameters() == pytest.approx(count, rel=0.002), name
    assert resolve_model("Llama3.1-405B").name == "llama-405b"
    with pytest.raises(ModelSpecError, match="llama-70b"):
        resolve_model("llama-70")


def test_hf_llama_configs_map_to_the_reference_shape(tmp_path) -> None:
    raw = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    source = resolve_model(str(tmp_path))
    assert source.llama == llama_from_hf(raw) and source.llama.kv_heads == 8 and source.supports_model_parallel


def test_sample_is_first_and_last_stage_by_first_and_last_tensor_rank() -> None:
    assert sample_ranks({"pp": 4, "dp": 8, "sp": 1, "tp": 8}) == [0, 7, 192, 199]
    assert sample_ranks({"pp": 1, "dp": 64, "sp": 1, "tp": 1}) == [0]


def test_step_time_adds_up_and_hides_overlappable_traffic() -> None:
    llama = PRESETS["llama-7b"]
    hw = load_profile("h100-sxm")
    row = SimpleNamespace(phase="backward", op="reduce_scatter", group="dp+sp", link="inter", count=10.0,
                          wire_bytes=1e9, msg_bytes=1e9, inter_bytes=1e9)
    probe = SimpleNamespace(micro_batch=1, gas=4, coords={"pp": 0}, local_params=resolve_model("llama-7b")
                            .parameters(), n_layers=32, traffic=[row], memory={"master_weights": 4e9 / 8},
                            grad_bytes=2, param_bytes=2)
    st = estimate_step(probe, llama, seq_len=4096, tp=1, sp=1, world_size=8, dp=8, checkpointing=False,
                       bubble=0.0, dtype="bf16", hw=hw)
    assert st.step_s == pytest.approx(st.compute_s + st.bubble_s + st.exposed_comm_s + st.optimizer_s)
    assert st.hidden_comm_s == pytest.approx(1e9 / hw.inter_node.effective + 10 * hw.inter_node.latency_s)
    per_token = model_flops_per_token(resolve_model("llama-7b").parameters(), 32000, 4096, 32, 4096)
    assert st.mfu == pytest.approx(per_token * st.tokens_per_step / (st.step_s * 989e12 * 8))
    exposed = estimate_step(probe, llama, seq_len=4096, tp=1, sp=1, world_size=8, dp=8, checkpointing=False,
                            bubble=0.5, dtype="bf16", hw=hw)
    assert exposed.bubble_s == pytest.approx(exposed.compute_s)
    memory_bound = estimate_step(probe, llama, seq_len=4096, tp=1, sp=1, world_size=8, dp=8, checkpointing=True,
                                 bubble=0.0, dtype="bf16", hw=hw, activation_bytes=10**9)
    assert memory_bound.elementwise_s == pytest.approx(6 * 10**9 * 4 / hw.hbm_bytes_per_s)  # 6 passes x 4 micro


@pytest.mark.parametrize("argv,message", [
    (["--model", "llama-7", "--world_size", "8"], "Did you mean"),
    (["--model", "llama-7b", "--world_size", "12", "--tp", "8"], "not divisible"),
    (["--model", "llama-7b", "--world_size", "8", "--sequence_parallel"], "needs --tp > 1"),
    (["--model", "llama-7b", "--world_size", "8", "--hardware", "a100"], "hardware profile"),
])
def test_cli_reports_bad_arguments_with_the_fix(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_inter_node_bytes_are_each_ports_share_of_what_must_cross() -> None:
    from shardwise.plan.probe import inter_node_bytes

    s = 1.6e9  # a gathered buffer; 64 ranks on 8 nodes of 8
    assert inter_node_bytes("all_gather", s, 63 / 64 * s, 64, 8, 8) == pytest.approx(s * 7 / 8 / 8)
    assert inter_node_bytes("all_reduce", s, 2 * 63 / 64 * s, 64, 8, 8) == pytest.approx(2 * s * 7 / 8 / 8)
    # hpZ's cross-node step: one rank per node gathers an eighth of the buffer -> the same bytes per port
    assert inter_node_bytes("all_gather", s / 8, 7 / 8 * s / 8, 8, 8, 1) == pytest.approx(s * 7 / 8 / 8)
    assert inter_node_bytes("all_to_all", s, 63 / 64 * s, 64, 8, 8) == pytest.approx(s * 56 / 64)
    assert inter_node_bytes("all_gather", s, s, 8, 1, 8) == 0.0
