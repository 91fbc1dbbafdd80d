"""AutoTP training plans, decided without ranks: which layers split, how heads group per rank, and the errors."""

from __future__ import annotations

import pytest

from shardwise.config import ConfigError, load_config
from shardwise.tp.autotp import AutoTPTrainingError, plan_training

transformers = pytest.importorskip("transformers")


def _llama(heads: int = 4, kv: int = 2, layers: int = 1):
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=8 * heads, intermediate_size=40,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv)
    return transformers.LlamaForCausalLM(config)


def test_llama_plan_splits_projections_and_the_untied_head_and_keeps_the_embedding_whole():
    plan = plan_training(_llama(), 2)
    styles = {p.path.rsplit(".", 1)[-1]: (p.style, p.grain) for p in plan.projections}
    # q and o fall on whole key/value groups (2 query heads of 8), k and v on whole heads, the MLP anywhere; the
    # untied LM head by vocabulary (its output gathered for the model's own loss)
    assert styles == {"q_proj": ("column", 16), "k_proj": ("column", 8), "v_proj": ("column", 8),
                      "o_proj": ("row", 16), "gate_proj": ("column", 1), "up_proj": ("column", 1),
                      "down_proj": ("row", 1), "lm_head": ("vocab", 1)}
    assert [p.path for p in plan.projections if p.style == "vocab"] == ["lm_head"]
    assert not any("embed" in p.path for p in plan.projections)
    assert "LM head lm_head split by vocabulary" in plan.summary()


def test_a_tied_lm_head_stays_whole_with_the_embedding():
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    model.tie_weights()
    plan = plan_training(model, 2)
    assert not any(p.style == "vocab" for p in plan.projections)
    assert "LM head replicated" in plan.summary()
    expected = "hf:base_model_tp_plan" if getattr(transformers.LlamaConfig(), "base_model_tp_plan", None) \
        else "table:llama"
    assert plan.source == expected


def test_without_hf_plan_the_architecture_table_decides():
    model = _llama()
    model.config.base_model_tp_plan = None
    hf_less = plan_training(model, 2)
    assert hf_less.source == "table:llama"
    assert [(p.path, p.style, p.grain) for p in hf_less.projections] == \
        [(p.path, p.style, p.grain) for p in plan_training(_llama(), 2).projections]


def test_uneven_split_keeps_key_value_groups_whole():
    plan = plan_training(_llama(heads=6, kv=3), 2)
    assert [plan.kv_heads(r) for r in range(2)] == [2, 1]
    assert [plan.attr_value("heads", r) for r in range(2)] == [4, 2]
    assert plan.attr_value("kv_groups", 1) == 2


def test_71_heads_on_8_ranks_names_heads_degree_and_fix():
    config = transformers.FalconConfig(vocab_size=32, hidden_size=71 * 2, num_hidden_layers=1,
                                       num_attention_heads=71, multi_query=True, new_decoder_architecture=False)
    with pytest.raises(AutoTPTrainingError) as err:
        plan_training(transformers.FalconForCausalLM(config), 8)
    msg = str(err.value)
    assert "71 attention heads" in msg and "autotp_size=8" in msg and "Fix" in msg


def test_fewer_kv_heads_than_ranks_is_refused():
    with pytest.raises(AutoTPTrainingError, match="2 key/value head.*autotp_size=4.*from 1 to 2"):
        plan_training(_llama(heads=4, kv=2), 4)


def test_zero3_with_autotp_is_a_config_error():
    with pytest.raises(ConfigError, match="autotp_size = 2.*stage 3"):
        load_config({"train_batch_size": 2, "zero_optimization": {"stage": 3},
                     "tensor_parallel": {"autotp_size": 2}})


def test_autotp_config_is_accepted():
    cfg = load_config({"train_batch_size": 2, "zero_optimization": {"stage": 2},
                       "tensor_parallel": {"autotp_size": 2}})
    assert cfg.tensor_parallel.autotp_size == 2
