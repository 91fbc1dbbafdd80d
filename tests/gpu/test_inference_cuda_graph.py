"""``init_inference(enable_cuda_graph=True)`` on CUDA: the forward is captured once per input shape and replayed,
with logits equal to the eager forward of the same module.

Stated tolerance (relative to the largest logit): fp32 1e-6; bf16 4e-3, one bf16 rounding step, in case cuBLAS
picks another algorithm under capture (the same kernels give identical logits). Checked on shardwise's LLaMA and a
tiny Hugging Face LLaMA called with ``use_cache=False`` (a KV-cache object cannot live in a static buffer, so
``generate()`` runs eagerly by design).
"""

from __future__ import annotations

import pytest
import torch

import shardwise
from shardwise.models import Llama, LlamaConfig
from tests.gpu.harness import run_gpu
from tests.inference_models import VOCAB, prompts, rel_err, tiny_model

TOL = {"fp32": 1e-6, "bf16": 4e-3}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _model(kind: str) -> torch.nn.Module:
    if kind == "hf-llama":
        return tiny_model("llama")
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)).eval()


def _logits(out) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out).detach().float().cpu().clone()  # replays overwrite


def _graphs(kind: str, precision: str) -> dict:
    engine = shardwise.init_inference(_model(kind), dtype=DTYPES[precision], enable_cuda_graph=True)
    kw = {"use_cache": False} if kind == "hf-llama" else {}
    ids = prompts(batch=2, length=7).to(engine.device)
    other = prompts(batch=2, length=7, seed=2).to(engine.device)
    shorter = ids[:, :5].contiguous()
    out: dict = {}
    with torch.no_grad():
        for name, x in (("first", ids), ("second", other), ("shorter", shorter)):
            out[f"eager_{name}"] = _logits(engine.module(x, **kw))
            out[f"graph_{name}"] = _logits(engine(x, **kw))
        out["same_buffer"] = engine(ids, **kw) is engine(other, **kw)  # replays write the same output object
    runner = engine._graph
    out.update(captures=runner.captures, replays=runner.replays, eager_calls=runner.eager_calls)
    return out


@pytest.mark.cuda_only
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["shardwise-llama", "hf-llama"])
def test_cuda_graph_replay_gives_the_eager_logits(kind: str, precision: str) -> None:
    (r,) = run_gpu(_graphs, kind, precision)
    assert r["captures"] == 2 and r["replays"] == 5 and r["eager_calls"] == 0, r
    assert r["same_buffer"]
    for name in ("first", "second", "shorter"):
        err = rel_err(r[f"graph_{name}"], r[f"eager_{name}"])
        print(f"{kind} {precision} {name}: graph vs eager {err:.2e}")
        assert err <= TOL[precision], f"{name}: {err}"
    assert rel_err(r["graph_first"], r["graph_second"]) > 0.01  # the replay saw the new input
