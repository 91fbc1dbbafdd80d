"""Meta-device loading on a 236 MiB model: no rank ever holds the whole model, and each reads only its slices.

The model (a LLaMA of 62M parameters, fp32, 236 MiB in one safetensors file, written once per session) is built
on the meta device from its config on every rank; each rank reads its slices and materialises its shard.
Measured per rank with the cpu accelerator's peak resident set (VmHWM, reset just before ``init_inference``):

    peak RSS - baseline  <  model bytes / TP + MARGIN

where the baseline is the rank's resident set with torch, transformers and the model class imported, and
``MARGIN`` (stated: 64 MiB) covers the safetensors mapping window that is resident while slices are read
(``loader.MAP_WINDOW_BYTES``, 32 MiB), one tensor in flight and the meta model's Python objects. Measured here:
peak growth = shard + 26..31 MiB (TP=2: +149 of a 118 MiB shard; TP=4: +85..88 of 59 MiB). Bytes read per rank:
exactly model bytes / TP for the split tensors (every tensor here splits evenly), and nothing else but the
replicated norms.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_ranks

MARGIN = 64 << 20
CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=4, vocab_size=8192, max_position_embeddings=256, bos_token_id=None,
              eos_token_id=None, pad_token_id=0, model_type="llama", architectures=["LlamaForCausalLM"])


@pytest.fixture(scope="session")
def big_llama(tmp_path_factory):
    """A 236 MiB LLaMA checkpoint with random weights, written directly (no model construction, ~1 s)."""
    import transformers
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("big_llama")
    config = transformers.LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"})
    config.save_pretrained(path)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"))
    model_bytes = sum(t.numel() * 4 for t in tensors.values())
    return str(path), model_bytes


def _load(path: str) -> dict:
    import gc

    from transformers import LlamaForCausalLM  # noqa: F401  (part of the runtime baseline)

    import shardwise
    from shardwise.accelerator import get_accelerator

    acc = get_accelerator()
    gc.collect()
    acc.empty_cache()
    acc.reset_peak_memory_stats()
    baseline = acc.memory_allocated()
    engine = shardwise.init_inference(checkpoint=path, tensor_parallel={"tp_size": torch.distributed.get_world_size()},
                                      dtype=torch.float32)
    peak = acc.max_memory_allocated()
    held = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    with torch.no_grad():  # the loaded shard works
        logits = engine(torch.tensor([[1, 2, 3, 4]])).logits
    return {"baseline": baseline, "peak": peak, "held": held, "stats": engine.load_stats.as_dict(),
            "finite": bool(torch.isfinite(logits).all()), "vocab": logits.shape[-1],
            "split": [k for p, k in engine.plan.vocab]}


def _check(results: list[dict], model_bytes: int, tp: int) -> None:
    for rank, r in enumerate(results):
        grew = r["peak"] - r["baseline"]
        bound = model_bytes / tp + MARGIN
        print(f"tp={tp} rank {rank}: baseline {r['baseline'] / 2**20:.0f} MB, peak +{grew / 2**20:.0f} MB "
              f"(bound {bound / 2**20:.0f} MB), holds {r['held'] / 2**20:.0f} MB, read "
              f"{r['stats']['bytes_read'] / 2**20:.1f} MB of {model_bytes / 2**20:.0f} MB")
        assert grew < bound, f"rank {rank} grew by {grew / 2**20:.0f} MB > {bound / 2**20:.0f} MB"
        assert r["finite"] and r["vocab"] == CONFIG["vocab_size"] and r["split"] == ["embedding", "head"]
        stats = r["stats"]
        assert stats["split_bytes_read"] * tp == stats["split_bytes_full"]  # exactly 1/tp of every split tensor
        replicated = stats["bytes_read"] - stats["split_bytes_read"]
        assert replicated < 64 << 10  # only the norms (9 vectors of 1024 floats)
        assert stats["bytes_full"] == model_bytes
        assert r["held"] <= model_bytes / tp + replicated


def test_meta_loading_memory_bound_tp2(big_llama):
    path, model_bytes = big_llama
    assert model_bytes >= 200 << 20
    _check(run_ranks(_load, path, world_size=2, timeout=120), model_bytes, 2)


@pytest.mark.world4
def test_meta_loading_memory_bound_tp4(big_llama):
    path, model_bytes = big_llama
    _check(run_ranks(_load, path, world_size=4, timeout=120), model_bytes, 4)
