"""The real-world ds_config corpus (tests/data/ds_configs, copied from /work/shared): every file loads or is
refused with a specific message, per file, and the outcomes are compared with DeepSpeed 0.19.8's (INDEX.md).

23 files are shell-script templates with bare placeholders (CONFIG_BATCH_SIZE, ZERO_STAGE, ...): they are
rendered with plausible values first, as their launch scripts would. 14 Hugging Face autotuning configs carry
"train_micro_batch_size_per_gpu": "auto"; raw they are refused (nobody filled "auto" in), and filled in the way
the HF Trainer would (2) they load, as in DeepSpeed's recorded run.
"""

import json
import re
from pathlib import Path

import pytest

from shardwise.config import ConfigError, load_config

DATA = Path(__file__).resolve().parent.parent / "data" / "ds_configs"
INDEX = json.loads((DATA / "index.json").read_text())["files"]
MDS = "megatron-deepspeed__examples_deepspeed__"
BING = "training__bing_bert__"
TR = "training__"

# Placeholder -> JSON text. Feature flags (..._ENABLE/_ENABLED) default to true: that is what the examples are
# for; other numeric placeholders default to 8.
PLACEHOLDERS = {
    "CONFIG_BATCH_SIZE": "16", "GBSIZE": "16", "GB_SIZE": "16",
    "CONFIG_MBSIZE": "4", "MBSIZE": "4", "MB_SIZE": "4", "BATCH_SIZE_PER_GPU": "4",
    "ZERO_STAGE": "1", "LOG_INTERVAL": "10", "PRESCALE_GRAD": "false",
    "CONFIG_FP16_ENABLED": "true", "CONFIG_BF16_ENABLED": "false", "FP16_ENABLE": "true",
    "SPARSE_PRUNING_BLOCK_PATTERN": '"4x1"', "SPARSE_PRUNING_EXCLUDED_MODULES": '["classifier"]',
    # random-LTD kept tokens: Megatron-DeepSpeed's scripts start at 128 (a multiple of seq_per_step 16) and end at
    # the sequence length; 8 would round down to 0 kept tokens, which the loader refuses
    "LTD_MIN": "128", "LTD_MAX": "2048",
}
# Some templates get another ZeRO stage so that stages 0-3 are all exercised.
ZERO_STAGE = {
    MDS + "bert_with_pile__ds_config_bert_TEMPLATE.json": "2",
    MDS + "sequence_parallel__ds_config_gpt_TEMPLATE.json": "3",
    MDS + "rebase__ds_config_gpt_TEMPLATE.json": "0",
}

# file -> (data-parallel size used, outcome): "ok", or the ConfigError kind of the refusal.
# dp is 2 unless the file only fits one rank (its train_batch_size == micro batch).
EXPECTED = {
    "compression__bert__config__XTC__ds_config_W1A8_Qgroup1_fp32.json": (2, "removed"),
    "compression__bert__config__XTC__ds_config_layer_reduction_W1Q8_fp32.json": (2, "removed"),
    "compression__bert__config__XTC__ds_config_layer_reduction_fp16.json": (2, "removed"),
    "compression__bert__config__ZeroQuant__ds_config_W48A8_Qgroup48_lkd_fp32.json": (2, "removed"),
    "compression__bert__config__ZeroQuant__ds_config_W8A8_Qgroup48_fp32.json": (2, "removed"),
    "compression__bert__config__ds_config.json": (1, "ok"),
    "compression__bert__config__ds_config_TEMPLATE.json": (2, "removed"),
    "compression__bert__config__ds_config_W1A8_Qgroup64_fp16.json": (2, "removed"),
    "compression__bert__config__ds_config_W1A8_Qgroup64_fp32.json": (2, "removed"),
    "compression__bert__config__ds_config_W1or2A8_Qgroup64_fp16.json": (2, "removed"),
    "compression__bert__config__ds_config_structural_pruning_TEMPLATE.json": (2, "removed"),
    "compression__cifar__config__ds_config.json": (1, "ok"),
    "compression__cifar__config__ds_config_channel_prune.json": (2, "removed"),
    "compression__gpt2__config__ds_config.json": (2, "ok"),
    "compression__gpt2__config__ds_config_W4or8A8_Qgroup64_fp16.json": (2, "removed"),
    "compression__gpt2__config__ds_config_W4or8A8_Qgroup64_fp32.json": (2, "removed"),
    "compression__gpt2__config__ds_config_W8A8_Qgroup64_fp16.json": (2, "removed"),
    "compression__gpt2__config__ds_config_W8A8_Qgroup64_fp32.json": (2, "removed"),
    MDS + "MoE__ds_config_gpt_TEMPLATE.json": (2, "ok"),
    MDS + "MoE__ds_config_gpt_Zero2_TEMPLATE.json": (2, "ok"),
    MDS + "bert_with_pile__ds_config_bert_TEMPLATE.json": (2, "ok"),
    MDS + "compression__ds_config_gpt_TEMPLATE.json": (2, "ok"),
    MDS + "compression__ds_config_gpt_TEMPLATE_compression.json": (2, "removed"),
    MDS + "curriculum_learning__ds_config_gpt_slw_TEMPLATE.json": (2, "ok"),
    MDS + "curriculum_learning__ds_zero_stage_1_config_baseline.json": (2, "conflict"),
    MDS + "curriculum_learning__ds_zero_stage_1_config_curriculum_fixed_linear.json": (2, "conflict"),
    MDS + "data_efficiency__bert__finetune__ds_config_bert_TEMPLATE.json": (2, "ok"),
    MDS + "data_efficiency__bert__finetune_glue__ds_config_bert_TEMPLATE.json": (2, "ok"),
    MDS + "data_efficiency__bert__pretrain__ds_config_bert_1clmetric_TEMPLATE.json": (2, "ok"),
    MDS + "data_efficiency__bert__pretrain__ds_config_bert_2clmetrics_TEMPLATE.json": (2, "ok"),
    MDS + "data_efficiency__gpt__eval__ds_config_eval_dummy.json": (2, "ok"),
    MDS + "data_efficiency__gpt__pretrain__ds_config_gpt_1clmetric_TEMPLATE.json": (2, "ok"),
    MDS + "data_efficiency__gpt__pretrain__ds_config_gpt_2clmetrics_TEMPLATE.json": (2, "ok"),
    MDS + "deepspeed4science__megatron_long_seq_support__ds_config_gpt_TEMPLATE.json": (2, "ok"),
    MDS + "finetune_hf_llama__ds_config.json": (2, "ok"),
    MDS + "finetune_hf_llama__ds_config_empty.json": (2, "ok"),
    MDS + "offload_pp__ds_config_gpt_TEMPLATE.json": (2, "ok"),
    MDS + "rebase__ds_config_gpt_TEMPLATE.json": (2, "ok"),
    MDS + "rebase__ds_config_gpt_slw_TEMPLATE.json": (2, "ok"),
    MDS + "sequence_parallel__ds_config_gpt_TEMPLATE.json": (2, "ok"),
    MDS + "universal_checkpointing__ds_config.json": (1, "ok"),
    TR + "BingBertGlue__glue_bert_base.json": (2, "ok"),
    TR + "BingBertGlue__glue_bert_large.json": (2, "ok"),
    TR + "BingBertSquad__1-bit_adam__mpi_ethernet__deepspeed_onebitadam_bsz96_config.json": (2, "removed"),
    TR + "BingBertSquad__1-bit_adam__mpi_infiniband__deepspeed_onebitadam_bsz96_config.json": (2, "removed"),
    TR + "BingBertSquad__1-bit_adam__nccl__deepspeed_onebitadam_bsz96_config.json": (2, "removed"),
    TR + "BingBertSquad__deepspeed_bsz24_config.json": (2, "ok"),
    TR + "MoQ__test.json": (2, "removed"),
    TR + "autotuning__hf__bert-base__ds_config_tune.json": (2, "batch"),
    TR + "autotuning__hf__bert-large__ds_config_tune.json": (2, "batch"),
    TR + "autotuning__hf__deberta__ds_config_fp16_tune.json": (2, "batch"),
    TR + "autotuning__hf__distilbert__ds_config_tune.json": (2, "batch"),
    TR + "autotuning__hf__dsconfigs__ds_config_fp16_tune.json": (2, "batch"),
    TR + "autotuning__hf__dsconfigs__ds_config_fp16_z0.json": (2, "batch"),
    TR + "autotuning__hf__dsconfigs__ds_config_fp16_z1.json": (2, "batch"),
    TR + "autotuning__hf__dsconfigs__ds_config_fp16_z2.json": (2, "batch"),
    TR + "autotuning__hf__dsconfigs__ds_config_fp16_z3.json": (2, "batch"),
    TR + "autotuning__hf__dsconfigs__ds_config_tune.json": (2, "batch"),
    TR + "autotuning__hf__dsconfigs__ds_config_z0.json": (2, "batch"),
    TR + "autotuning__hf__dsconfigs__ds_config_z1.json": (2, "batch"),
    TR + "autotuning__hf__dsconfigs__ds_config_z2.json": (2, "batch"),
    TR + "autotuning__hf__dsconfigs__ds_config_z3.json": (2, "batch"),
    BING + "01_adam__mpi_ethernet__deepspeed_bsz4k_01adam_config_seq128_mpi_ethernet.json": (2, "removed"),
    BING + "01_adam__mpi_ethernet__deepspeed_bsz4k_01adam_config_seq512_mpi_ethernet.json": (2, "removed"),
    BING + "01_adam__mpi_infiniband__deepspeed_bsz4k_01adam_config_seq128_mpi_infiniband.json":
        (2, "removed"),
    BING + "01_adam__mpi_infiniband__deepspeed_bsz4k_01adam_config_seq512_mpi_infiniband.json":
        (2, "removed"),
    BING + "01_adam__nccl__deepspeed_bsz4k_01adam_config_seq128_nccl.json": (2, "removed"),
    BING + "01_adam__nccl__deepspeed_bsz4k_01adam_config_seq512_nccl.json": (2, "removed"),
    BING + "1-bit_adam__mpi_ethernet__deepspeed_bsz4k_onebitadam_config_seq128_mpi_ethernet.json":
        (2, "removed"),
    BING + "1-bit_adam__mpi_infiniband__deepspeed_bsz4k_onebitadam_config_seq128_mpi_infiniband.json":
        (2, "removed"),
    BING + "1-bit_adam__nccl__deepspeed_bsz4k_onebitadam_config_seq128_nccl.json": (2, "removed"),
    BING + "1-bit_lamb__mpi_ethernet__deepspeed_bsz32k_onebitlamb_config_seq512_mpi_ethernet.json":
        (2, "removed"),
    BING + "1-bit_lamb__mpi_ethernet__deepspeed_bsz64k_onebitlamb_config_seq128_mpi_ethernet.json":
        (2, "removed"),
    BING + "1-bit_lamb__mpi_infiniband__deepspeed_bsz32k_onebitlamb_config_seq512_mpi_infiniband.json":
        (2, "removed"),
    BING + "1-bit_lamb__mpi_infiniband__deepspeed_bsz64k_onebitlamb_config_seq128_mpi_infiniband.json":
        (2, "removed"),
    BING + "1-bit_lamb__nccl__deepspeed_bsz32k_onebitlamb_config_seq512_nccl.json": (2, "removed"),
    BING + "1-bit_lamb__nccl__deepspeed_bsz64k_onebitlamb_config_seq128_nccl.json": (2, "removed"),
    BING + "deepspeed_bsz32k_lamb_config_seq512.json": (2, "ok"),
    BING + "deepspeed_bsz4k_progressive_layer_drop_config_seq128.json": (2, "removed"),
    BING + "deepspeed_bsz64k_lamb_config_seq128.json": (2, "removed"),
    BING + "glue_bert_base.json": (1, "ok"),
    BING + "glue_bert_large.json": (2, "ok"),
    TR + "data_efficiency__gpt_finetuning__config__ds_config_gpt_base_random_ltd.json": (2, "ok"),
    TR + "data_efficiency__gpt_finetuning__config__ds_config_gpt_medium_random_ltd.json": (2, "ok"),
    TR + "data_efficiency__gpt_finetuning__finetune__ds_config_gpt2-medium_1clmetric_TEMPLATE.json":
        (2, "ok"),
    TR + "data_efficiency__gpt_finetuning__finetune__ds_config_gpt2-medium_2clmetrics_TEMPLATE.json":
        (2, "ok"),
    TR + "data_efficiency__gpt_finetuning__finetune__ds_config_gpt2_TEMPLATE.json": (2, "ok"),
    TR + "data_efficiency__vit_finetuning__config__ds_config_cifar_random_ltd.json": (1, "ok"),
    TR + "data_efficiency__vit_finetuning__config__ds_config_imagenet_random_ltd.json": (2, "ok"),
    TR + "gan__gan_deepspeed_config.json": (2, "ok"),
    TR + "imagenet__config__ds_config.json": (2, "ok"),
    TR + "imagenet__config__ds_fp16_config.json": (2, "ok"),
    TR + "imagenet__config__ds_fp16_z1_config.json": (2, "ok"),
    TR + "pipeline_parallelism__ds_config.json": (2, "ok"),
}

# Files where our outcome (after the HF "auto" fill-in) differs from DeepSpeed 0.19.8's on 2 CPU ranks, and why.
DIFFERENCES_FROM_DEEPSPEED = {
    "compression__bert__config__ds_config.json": "all-disabled compression_training block accepted with a warning",
    "compression__cifar__config__ds_config.json": "written for 1 rank; loads at dp 1 (DeepSpeed ran 2 ranks)",
    MDS + "universal_checkpointing__ds_config.json": "written for 1 rank; loads at dp 1",
    BING + "glue_bert_base.json": "written for 1 rank; loads at dp 1",
    MDS + "offload_pp__ds_config_gpt_TEMPLATE.json": "DeepSpeed failed at engine level (client optimizer + offload)",
    BING + "deepspeed_bsz32k_lamb_config_seq512.json": "DeepSpeed failed at engine level (no CPU FusedLamb)",
    TR + "data_efficiency__vit_finetuning__config__ds_config_cifar_random_ltd.json":
        "written for 1 rank; loads at dp 1",
    **{name: "legacy curriculum_learning accepted (DeepSpeed 0.19.6's behaviour; 0.19.8 refuses it)" for name in (
        MDS + "MoE__ds_config_gpt_TEMPLATE.json",
        MDS + "MoE__ds_config_gpt_Zero2_TEMPLATE.json",
        MDS + "compression__ds_config_gpt_TEMPLATE.json",
        MDS + "curriculum_learning__ds_config_gpt_slw_TEMPLATE.json",
        MDS + "rebase__ds_config_gpt_slw_TEMPLATE.json",
    )},
}

# What each refusal kind must say (besides naming the key path and a fix).
PHRASE = {
    "removed": "DeepSpeed 0.19.8 itself removed",
    "unsupported": "is not supported yet by shardwise",
    "batch": "train_micro_batch_size_per_gpu",
    "conflict": "max_grad_norm",
}


def render(entry: dict) -> dict:
    """The file's config as its launch script would produce it (placeholders substituted), parsed."""
    text = (DATA / entry["file"]).read_text()
    for name in entry["placeholders"]:
        value = ZERO_STAGE.get(entry["file"], "1") if name == "ZERO_STAGE" else PLACEHOLDERS.get(
            name, "true" if name.endswith(("ENABLE", "ENABLED", "FORWARD")) else "8")
        text = re.sub(r"([:\[,]\s*)" + re.escape(name) + r"\b", lambda m, v=value: m.group(1) + v, text)
    return json.loads(text)


def outcome(config: dict, dp: int) -> tuple[str, ConfigError | None]:
    try:
        load_config(config, dp_world_size=dp, log=False)
    except ConfigError as err:
        return err.kind, err
    return "ok", None


def hf_fill_auto(config: dict) -> dict:
    """What the Hugging Face Trainer does before calling initialize: replace "auto" batch values."""
    return {k: (2 if v == "auto" and k == "train_micro_batch_size_per_gpu" else v) for k, v in config.items()}


def deepspeed_outcomes() -> dict[str, bool]:
    """file -> whether DeepSpeed 0.19.8 initialised it (INDEX.md's last column)."""
    rows = {}
    for line in (DATA / "INDEX.md").read_text().splitlines():
        match = re.match(r"\| `([^`]+\.json)` \|.*\| ([✓✗])[^|]* \|\s*$", line)
        if match:
            rows[match.group(1)] = match.group(2) == "✓"
    return rows


def test_expected_table_covers_the_whole_corpus():
    files = {entry["file"] for entry in INDEX}
    assert len(files) == 94 == len(EXPECTED)
    assert set(EXPECTED) == files
    assert {p.name for p in DATA.glob("*.json")} - {"index.json"} == files


@pytest.mark.parametrize("entry", INDEX, ids=lambda e: e["file"][:80])
def test_corpus_file(entry):
    dp, expected = EXPECTED[entry["file"]]
    kind, err = outcome(render(entry), dp)
    assert kind == expected, f"{entry['file']}: expected {expected}, got {kind}: {err}"
    if err is not None:
        text = str(err)
        assert err.path and err.path.split("[")[0] in text
        assert PHRASE[kind] in text and "Fix:" in text


def test_auto_files_load_once_auto_is_filled_in():
    auto_files = [e for e in INDEX if e["auto_keys"]]
    assert len(auto_files) == 14
    for entry in auto_files:
        raw_kind, err = outcome(render(entry), 2)
        assert raw_kind == "batch" and "\"auto\"" in str(err)
        cfg = load_config(hf_fill_auto(render(entry)), dp_world_size=2, log=False)
        assert cfg.train_micro_batch_size_per_gpu == 2 and cfg.gradient_accumulation_steps == 1
        if cfg.autotuning.enabled:
            assert any("DeepSpeed's separate autotuner" in w for w in cfg.warnings)


def test_files_written_for_one_rank_fail_at_two_like_deepspeed():
    one_rank = [e for e in INDEX if EXPECTED[e["file"]] == (1, "ok")]
    assert len(one_rank) == 5
    for entry in one_rank:
        kind, err = outcome(render(entry), 2)
        assert kind == "batch"
        assert "Gradient accumulation steps: 0" in str(err) and "written for fewer ranks" in str(err)


def test_differences_from_deepspeed_are_the_documented_ones():
    deepspeed = deepspeed_outcomes()
    assert len(deepspeed) == 94 and sum(deepspeed.values()) == 43
    auto = {e["file"] for e in INDEX if e["auto_keys"]}
    ours = {name: kind == "ok" or name in auto for name, (_, kind) in EXPECTED.items()}
    differing = {name for name in EXPECTED if ours[name] != deepspeed[name]}
    assert differing == set(DIFFERENCES_FROM_DEEPSPEED)


def test_corpus_summary_matches_docs():
    kinds = [kind for _, kind in EXPECTED.values()]
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert counts == {"ok": 41, "batch": 14, "removed": 37, "conflict": 2}
    docs = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert "41 of the 94 load as written; 55 once" in docs.read_text()
