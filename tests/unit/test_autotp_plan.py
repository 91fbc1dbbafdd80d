"""Auto-TP planning without ranks: layout math, per-architecture plans on meta models, and the planning errors.

Everything here runs on the meta device (no weights, no torch.distributed): planning only reads module types and
shapes, which is what lets every error be raised before a single weight is read.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from shardwise.inference.autotp import AutoTPError, plan_tensor_parallel, tie_declared_weights, tied_groups
from shardwise.tp import architectures as A
from shardwise.tp import layouts as L
from tests.inference_models import ARCHS, tiny_config


def meta_model(config) -> nn.Module:
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    tie_declared_weights(model)  # as init_inference does (5.0 leaves a meta model untied)
    return model


# -- layouts ------------------------------------------------------------------------------------------------------
def test_even_layout_keeps_heads_and_parts():
    gpt2_qkv = L.even(3 * 64, 2, grain=16, parts=(64, 64, 64))  # [Q|K|V], 4 heads of 16
    assert gpt2_qkv.ranges(0) == ((0, 32), (64, 96), (128, 160))
    assert gpt2_qkv.ranges(1) == ((32, 64), (96, 128), (160, 192))
    assert gpt2_qkv.split is not None and gpt2_qkv.local_size(1) == 96
    assert L.even(90, 4).per_rank == (((0, 23),), ((23, 46),), ((46, 68),), ((68, 90),))  # uneven MLP


def test_multi_query_layout_replicates_key_and_value():
    mqa = L.split_with_replicated(64, (16, 16), 4, grain=16)  # Falcon: 4 query heads, 1 K head, 1 V head
    assert mqa.split is None and mqa.total == 96
    assert mqa.ranges(0) == ((0, 16), (64, 96))
    assert mqa.ranges(3) == ((48, 96),)  # its query head touches the shared K/V: one read
    assert all(mqa.local_size(r) == 48 for r in range(4))


def test_kv_heads_split_or_shared():
    assert L.kv_heads(4, 16, 2).ranges(1) == ((32, 64),)
    shared = L.kv_heads(2, 16, 4)  # ranks 0,1 share KV head 0; ranks 2,3 share KV head 1
    assert [shared.ranges(r) for r in range(4)] == [((0, 16),), ((0, 16),), ((16, 32),), ((16, 32),)]
    assert L.local_kv_heads(2, 4) == 1 and L.local_kv_heads(4, 2) == 2
    with pytest.raises(ValueError):
        L.kv_heads(3, 16, 2)


def test_valid_degrees():
    assert L.valid_degrees(71, 71, "same") == [1, 71]
    assert L.valid_degrees(32, 8, "gqa") == [1, 2, 4, 8, 16, 32]
    assert L.valid_degrees(12, 3, "gqa") == [1, 3, 6, 12]  # 2 and 4 neither divide 3 nor are multiples of it
    assert L.valid_degrees(16, 4, "grouped") == [1, 2, 4]
    assert L.valid_degrees(8, 1, "mqa") == [1, 2, 4, 8]


# -- plans per architecture ---------------------------------------------------------------------------------------
#: name -> every head attribute any supported transformers release gives the attention module, and its value after
#: tp=2 (a release holds a subset: 4.45's LLaMA reshapes with num_heads, 5.x's with -1 and num_key_value_groups)
EXPECTED_LOCAL = {
    "gpt2": {"num_heads": 2, "split_size": 32, "embed_dim": 32},
    "bloom": {"num_heads": 2, "hidden_size": 32, "split_size": 32, "pretraining_tp": 1},  # + its fix-up
    "opt": {"num_heads": 2, "embed_dim": 32},
    # multi-query: one key/value head on every rank, so each rank repeats it for its 2 query heads (not 4)
    "falcon": {"num_heads": 2, "num_kv_heads": 1, "num_key_value_groups": 2, "hidden_size": 32, "split_size": 32},
    "falcon_grouped": {"num_heads": 2, "num_kv_heads": 1, "num_key_value_groups": 2, "hidden_size": 32,
                       "split_size": 32},
    "falcon_alibi": {"num_heads": 2, "num_kv_heads": 2, "num_key_value_groups": 1, "hidden_size": 32,
                     "split_size": 32},
    "gptj": {"num_attention_heads": 2, "embed_dim": 32},
    "llama": {"num_heads": 2, "num_key_value_heads": 1, "num_key_value_groups": 2, "hidden_size": 32},
    "mistral": {"num_heads": 2, "num_key_value_heads": 1, "num_key_value_groups": 2, "hidden_size": 32},
    "qwen2": {"num_heads": 2, "num_key_value_heads": 2, "num_key_value_groups": 1, "hidden_size": 32},
    "gpt_neox": {"num_attention_heads": 2, "hidden_size": 32},
}


def _held_ints(module: nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(module).items() if isinstance(v, int) and not isinstance(v, bool)}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_plan_for_every_architecture(name):
    model = meta_model(tiny_config(name))
    plan = plan_tensor_parallel(model, 2)
    layers = 2
    rule = A.rule_for(model.config)
    per_block = len(rule.projections)
    assert len(plan.projections) == per_block * layers
    rows = [p for p in plan.projections if p.style == "row"]
    assert len(rows) == 2 * layers and all(p.layout.split is not None for p in rows)
    attention = model.get_submodule(f"{rule.blocks}.0.{rule.attention}")
    held = _held_ints(attention)
    attrs = {a: v for path, a, v in plan.attrs if path.endswith(".0." + rule.attention)}
    # every head attribute the installed release holds is divided, to the value its kind gives
    assert attrs == {k: v for k, v in EXPECTED_LOCAL[name].items() if k in held}
    assert not [a for a in A.GUARDED_ATTRS if a in held and a not in attrs]
    assert plan.vocab == []  # tiny vocabulary: replicated under "auto"
    assert bool(plan.head_hooks) == (name in ("bloom", "falcon_alibi"))
    assert "tp=2" in plan.summary()


def test_falcon_multi_query_at_tp4_repeats_the_shared_head_once_per_local_query_head():
    model = meta_model(tiny_config("falcon"))
    plan = plan_tensor_parallel(model, 4)
    attrs = {a: v for path, a, v in plan.attrs if path == "transformer.h.0.self_attention"}
    assert attrs["num_heads"] == 1 and attrs["num_kv_heads"] == 1
    assert attrs.get("num_key_value_groups", 1) == 1  # 5.x: the shared K/V head repeated once, not 4 times


def test_an_attention_attribute_the_rule_does_not_know_is_refused():
    """A transformers release that adds a head count the rule does not divide must fail at planning, not produce a
    wrong reshape (as 5.x's FalconAttention.num_key_value_groups did before the rule listed it)."""
    model = meta_model(tiny_config("opt"))
    for block in model.model.decoder.layers:
        block.self_attn.num_key_value_heads = 4  # a head count OPT's rule has never seen
    with pytest.raises(AutoTPError, match=r"self_attn holds num_key_value_heads=4.*model_type 'opt'.*injection_policy"):
        plan_tensor_parallel(model, 2)


def test_fused_layouts_per_architecture():
    def qkv(name: str, path: str):
        plan = plan_tensor_parallel(meta_model(tiny_config(name)), 2)
        return next(p.layout for p in plan.projections if p.path.endswith(path))

    assert qkv("bloom", "0.self_attention.query_key_value").ranges(1) == ((96, 192),)  # 2 heads x [q,k,v] x 16
    assert qkv("gpt_neox", "0.attention.query_key_value").ranges(0) == ((0, 96),)
    assert qkv("falcon", "0.self_attention.query_key_value").ranges(0) == ((0, 32), (64, 96))  # MQA
    assert qkv("falcon_grouped", "0.self_attention.query_key_value").ranges(1) == ((64, 128),)  # 1 group of 4
    assert qkv("gpt2", "0.attn.c_attn").ranges(1) == ((32, 64), (96, 128), (160, 192))


def test_tied_groups_and_vocab_decision():
    gpt2 = meta_model(tiny_config("gpt2"))
    assert tied_groups(gpt2) == [["transformer.wte.weight", "lm_head.weight"]]
    assert plan_tensor_parallel(gpt2, 2, vocab_parallel=True).vocab == [("transformer.wte", "embedding"),
                                                                       ("lm_head", "head")]
    big = tiny_config("llama")
    big.vocab_size = 70000  # 70000 x 64 = 4.5M elements >= VOCAB_SPLIT_MIN_ELEMENTS: split under "auto"
    assert [k for _, k in plan_tensor_parallel(meta_model(big), 2).vocab] == ["embedding", "head"]
    assert plan_tensor_parallel(meta_model(big), 2, vocab_parallel=False).vocab == []
    assert plan_tensor_parallel(meta_model(big), 1).projections == []  # tp=1: nothing to split


# -- errors before any weight is read -----------------------------------------------------------------------------
def test_indivisible_heads_names_model_count_and_valid_degrees():
    config = transformers.FalconConfig(hidden_size=4544, num_attention_heads=71, num_hidden_layers=2,
                                       multi_query=True, vocab_size=1000)
    config._name_or_path = "tiiuae/falcon-7b"
    with pytest.raises(AutoTPError) as err:
        plan_tensor_parallel(meta_model(config), 8)
    msg = str(err.value)
    assert "tiiuae/falcon-7b (FalconForCausalLM)" in msg and "71 attention heads" in msg
    assert "tp_size=8" in msg and "Valid tp_size values for this model: 1, 71" in msg


def test_gqa_degree_must_split_or_share_kv_heads():
    config = tiny_config("llama")
    config.num_attention_heads, config.num_key_value_heads, config.hidden_size = 12, 3, 96
    with pytest.raises(AutoTPError, match=r"12 attention heads with 3 key/value heads.*1, 3, 6, 12"):
        plan_tensor_parallel(meta_model(config), 4)
    assert plan_tensor_parallel(meta_model(config), 6).info.local_kv_heads(6) == 1


def test_unknown_architecture_suggests_an_injection_policy():
    config = transformers.GPTNeoConfig(hidden_size=64, num_layers=2, num_heads=4, vocab_size=100,
                                       attention_types=[[["global"], 2]])
    with pytest.raises(AutoTPError) as err:
        plan_tensor_parallel(meta_model(config), 2)
    msg = str(err.value)
    assert "model_type 'gpt_neo'" in msg and "supported: bloom, falcon" in msg
    assert "injection_policy={GPTNeoBlock: ('attn.attention.out_proj', 'mlp.c_proj')}" in msg


class _Block(nn.Module):
    def __init__(self, heads: int = 4, width: int = 32) -> None:
        super().__init__()
        self.n_heads = heads
        self.q, self.o = nn.Linear(width, width), nn.Linear(width, width)


def test_injection_policy_plan_and_errors():
    model = nn.Sequential(_Block(), _Block())
    plan = plan_tensor_parallel(model, 2, injection_policy={_Block: "o"})
    assert [(p.path, p.style) for p in plan.projections] == [("0.q", "column"), ("0.o", "row"), ("1.q", "column"),
                                                             ("1.o", "row")]
    assert ("0", "n_heads", 2) in plan.attrs
    assert plan_tensor_parallel(model, 2, injection_policy={"_Block": ("o",)}).source == "injection_policy"
    with pytest.raises(AutoTPError, match=r"names \['out'\], which match no Linear"):
        plan_tensor_parallel(model, 2, injection_policy={_Block: ("out",)})
    with pytest.raises(AutoTPError, match=r"3 heads \(0.n_heads\) cannot be split evenly .* 1, 3"):
        plan_tensor_parallel(nn.Sequential(_Block(heads=3, width=30)), 2, injection_policy={_Block: ("o",)})
    with pytest.raises(AutoTPError, match="not a module class"):
        plan_tensor_parallel(model, 2, injection_policy={"Nope": ("o",)})
