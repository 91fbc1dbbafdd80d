"""Tiny random Hugging Face models for the inference tests, one per supported architecture, saved to local files.

Every config has 4 attention heads (so TP=2 and TP=4 divide), 2 layers, a small vocabulary, no dropout, and a
large init range so that logits are peaked and greedy generation is stable against rounding. Variants cover the
layouts auto-TP must handle: GQA with KV heads split (qwen2) and replicated (llama at TP=4, mistral with one KV
head), Falcon's multi-query, new-decoder (grouped) and ALiBi forms, an uneven MLP split (gptj, 90 over 4 ranks)
and an uneven vocabulary (llama, 102 tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 102


def tiny_config(name: str) -> Any:
    """The transformers config of architecture variant ``name`` (see ``ARCHS``)."""
    import transformers as T

    c = dict(bos_token_id=None, eos_token_id=None, pad_token_id=0, initializer_range=0.2)
    llama = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=VOCAB, max_position_embeddings=128, **c)
    if name == "llama":
        return T.LlamaConfig(num_key_value_heads=2, **llama)
    if name == "mistral":
        return T.MistralConfig(num_key_value_heads=1, sliding_window=None, **llama)
    if name == "qwen2":
        return T.Qwen2Config(num_key_value_heads=4, **llama)
    if name == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, **c)
    if name == "bloom":
        return T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB, **c)
    if name == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                           word_embed_proj_dim=64, max_position_embeddings=128, dropout=0.0, **c)
    if name.startswith("falcon"):
        extra = {"falcon": dict(multi_query=True),
                 "falcon_grouped": dict(new_decoder_architecture=True, num_kv_heads=2),
                 "falcon_alibi": dict(multi_query=False, alibi=True, parallel_attn=False, bias=True)}[name]
        return T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                              max_position_embeddings=128, **extra, **c)
    if name == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               vocab_size=VOCAB, max_position_embeddings=128, **c)
    if name == "gptj":
        return T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, n_inner=90, rotary_dim=8, vocab_size=VOCAB,
                            n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **c)
    raise KeyError(name)


#: variant -> tensor-parallel degrees whose heads divide (TP=4 too where possible)
ARCHS = {
    "llama": (2, 4), "mistral": (2, 4), "qwen2": (2, 4), "gpt2": (2, 4), "bloom": (2, 4), "opt": (2, 4),
    "falcon": (2, 4), "falcon_grouped": (2,), "falcon_alibi": (2,), "gpt_neox": (2, 4), "gptj": (2, 4),
}


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised model of variant ``name`` (deterministic for a seed), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(name)).to(dtype).eval()


def prompts(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """Fixed prompt token ids (never the pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def save(model: torch.nn.Module, path: Path) -> Path:
    """``save_pretrained`` as safetensors; returns the directory."""
    model.save_pretrained(path, safe_serialization=True)
    return path


def from_pretrained(path: Path | str, dtype: torch.dtype) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)``, in eval mode. transformers renamed the keyword
    ``torch_dtype`` to ``dtype`` in 4.56 (the old name warns since): the tests run on both sides of the rename."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(path, **{key: dtype}).eval()


def reference(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, greedy generation) of the single-process model."""
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return logits, tokens


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| in float64: the relative error of a whole tensor."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max()).item()
