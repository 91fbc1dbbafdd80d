"""Auto-TP parity: every supported architecture split over 2 (and 4) ranks equals the single-process model.

For each tiny random model (``tests/inference_models.py``), saved as a Hugging Face safetensors directory: the
ranks build it on the meta device from its config.json, read only their slices, and run the prompt forward and a
32-token greedy generation. Stated tolerance, fp32: the prompt logits of every rank are within 1e-5 of the
single-process logits relative to their largest magnitude (max |tp - ref| <= 1e-5 * max |ref|; element-wise
relative error is meaningless for logits near zero), and the generated tokens are identical. Ranks agree with each
other bitwise.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_ranks
from tests.inference_models import ARCHS, prompts, reference, rel_err, save, tiny_model

RTOL_FP32 = 1e-5
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (checkpoint dir, prompt ids, reference logits, reference tokens), built once per module."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model = tiny_model(name)
            path = save(model, tmp_path_factory.mktemp(name))
            ids = prompts()
            cache[name] = (str(path), ids, *reference(model, ids, NEW_TOKENS))
        return cache[name]

    return get


def _generate(path: str, ids: torch.Tensor, tp: int, kwargs: dict) -> tuple:
    import shardwise

    engine = shardwise.init_inference(checkpoint=path, **({"tensor_parallel": {"tp_size": tp}, "dtype": "fp32"}
                                                          | kwargs))
    assert engine.mp_world_size == tp and engine.dtype == torch.float32
    with torch.no_grad():
        logits = engine(ids).logits
    tokens = engine.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return logits, tokens, engine.load_stats.split_bytes_read, engine.load_stats.split_bytes_full


def _check(results: list, ref_logits: torch.Tensor, ref_tokens: torch.Tensor, tp: int) -> None:
    for rank, (logits, tokens, split_read, split_full) in enumerate(results):
        assert torch.equal(logits, results[0][0]), f"rank {rank} logits differ from rank 0's"
        assert rel_err(logits, ref_logits) <= RTOL_FP32, f"rank {rank}: rel err {rel_err(logits, ref_logits):.2e}"
        assert torch.equal(tokens, ref_tokens), f"rank {rank}: greedy tokens differ from the single-process model"
        # each rank read its 1/tp share of the split tensors (up to replicated key/value heads)
        assert split_read <= split_full / tp * 1.35, (rank, split_read, split_full)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_tp2_equals_single_process(saved, name):
    path, ids, ref_logits, ref_tokens = saved(name)
    _check(run_ranks(_generate, path, ids, 2, {}, world_size=2, timeout=120), ref_logits, ref_tokens, 2)


@pytest.mark.world4
@pytest.mark.parametrize("name", sorted(n for n, degrees in ARCHS.items() if 4 in degrees))
def test_tp4_equals_single_process(saved, name):
    path, ids, ref_logits, ref_tokens = saved(name)
    _check(run_ranks(_generate, path, ids, 4, {}, world_size=4, timeout=120), ref_logits, ref_tokens, 4)


@pytest.mark.parametrize("name,tp", [("gpt2", 2), ("llama", 4)])
def test_vocab_parallel_embedding_and_head(saved, name, tp):
    """Embedding and LM head split along the vocabulary (tied in GPT-2, untied and uneven 102/4 in LLaMA)."""
    path, ids, ref_logits, ref_tokens = saved(name)
    out = run_ranks(_generate, path, ids, tp, {"tensor_parallel": {"tp_size": tp, "vocab_parallel": True}},
                    world_size=tp, timeout=120)
    _check(out, ref_logits, ref_tokens, tp)


def test_bloom_with_deepspeeds_manual_policy(saved):
    """The policy DeepSpeed's BLOOM script passes without kernel injection: ALiBi is still cut per rank."""
    from transformers.models.bloom.modeling_bloom import BloomBlock

    path, ids, ref_logits, ref_tokens = saved("bloom")
    policy = {"injection_policy": {BloomBlock: ("self_attention.dense", "mlp.dense_4h_to_h")}}
    _check(run_ranks(_generate, path, ids, 2, policy, world_size=2, timeout=120), ref_logits, ref_tokens, 2)
