"""init_inference in one process: config handling, DeepSpeed names, OnDevice, graph capture and the tp=1 engine."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import shardwise
from shardwise.accelerator import set_accelerator
from shardwise.accelerator.cpu import CpuAccelerator
from shardwise.config.errors import ConfigError
from shardwise.inference import DeepSpeedInferenceConfig, load_inference_config
from shardwise.inference.graphs import GraphRunner
from tests.inference_models import prompts, reference, rel_err, save, tiny_model


# -- config -------------------------------------------------------------------------------------------------------
def test_deepspeed_names_resolve():
    import shardwise as deepspeed
    from shardwise.inference.config import DeepSpeedInferenceConfig as Cfg
    from shardwise.inference.engine import InferenceEngine

    assert deepspeed.init_inference is shardwise.inference.init_inference
    assert deepspeed.InferenceEngine is InferenceEngine and Cfg is DeepSpeedInferenceConfig
    assert deepspeed.OnDevice is shardwise.inference.OnDevice
    defaults = deepspeed.default_inference_config()
    assert defaults["dtype"] == torch.float16 and defaults["max_out_tokens"] == 1024
    assert defaults["tensor_parallel"]["tp_size"] == 1 and defaults["replace_with_kernel_inject"] is False


@pytest.mark.parametrize("spelling,dtype", [("fp16", torch.float16), ("half", torch.float16), ("bf16", torch.bfloat16),
                                            ("torch.bfloat16", torch.bfloat16), ("float", torch.float32),
                                            (torch.float32, torch.float32)])
def test_dtype_spellings(spelling, dtype):
    assert load_inference_config({"dtype": spelling}).dtype == dtype


def test_merge_aliases_and_deprecations(tmp_path):
    path = tmp_path / "inference.json"
    path.write_text(json.dumps({"dtype": "bf16", "tp": {"tp_size": 2}, "kernel_inject": True}))
    cfg = load_inference_config(str(path), {"max_tokens": 64, "args": {"device": "cpu"}})
    assert cfg.dtype == torch.bfloat16 and cfg.tensor_parallel.tp_size == 2 and cfg.replace_with_kernel_inject
    assert cfg.max_out_tokens == 64 and cfg.device == "cpu"
    assert load_inference_config(None, {"mp_size": 4}).tensor_parallel.tp_size == 4
    assert load_inference_config({"tensor_parallel": {"tp_size": 4, "enabled": False}}).tensor_parallel.tp_size == 1
    same = load_inference_config({"dtype": "fp32"}, {"dtype": "fp32"})  # same value twice is fine
    assert same.dtype == torch.float32


@pytest.mark.parametrize("config,kwargs,message", [
    ({"dtype": "fp16"}, {"dtype": "bf16"}, "given in config .* and as a keyword argument"),
    ({}, {"dtype": "int4"}, "dtype"),
    ({}, {"dtype": "int8"}, "int8 inference .* not implemented"),
    ({}, {"tensor_paralel": {"tp_size": 2}}, "tensor_paralel"),
    ({}, {"mp_size": 2, "tensor_parallel": {"tp_size": 4}}, "mp_size=2 .* conflicts"),
    ({}, {"max_out_tokens": 0}, "max_out_tokens"),
    ({}, {"use_triton": True}, "Triton"),
    ({}, {"zero": {"stage": 3}}, "ZeRO-Inference is not implemented"),
    ({}, {"tensor_parallel": {"vocab_parallel": "sometimes"}}, "vocab_parallel"),
])
def test_config_errors(config, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_inference_config(config, kwargs)


# -- OnDevice -----------------------------------------------------------------------------------------------------
def test_on_device_builds_on_meta_in_dtype_and_restores():
    with shardwise.OnDevice(dtype=torch.bfloat16, device="meta"):
        layer = nn.Linear(1000, 1000)
    assert layer.weight.is_meta and layer.weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32 and not torch.empty(1).is_meta
    with shardwise.OnDevice(dtype=torch.float16, enabled=False):
        assert not nn.Linear(2, 2).weight.is_meta


# -- graph capture ------------------------------------------------------------------------------------------------
class _Record(TorchDispatchMode):
    """Records every aten op with its tensors: a CPU stand-in for a device graph."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out


class _Graph:
    ops: list = []


class GraphCpu(CpuAccelerator):
    """The cpu accelerator plus a faithful fake of graph capture: replay re-runs the recorded ops on the same
    (static) tensors and writes into the recorded outputs, as a CUDA graph replay does."""

    replays = 0

    def supports_graph_capture(self) -> bool:
        return True

    def create_graph(self) -> _Graph:
        return _Graph()

    @contextlib.contextmanager
    def capture_to_graph(self, graph, pool=None, stream=None):
        with _Record() as rec:
            yield
        graph.ops = rec.ops

    @torch.no_grad()
    def replay_graph(self, graph) -> None:
        self.replays += 1
        for func, args, kwargs, out in graph.ops:
            for old, new in zip(tree_leaves(out), tree_leaves(func(*args, **kwargs))):
                if isinstance(old, torch.Tensor):
                    old.copy_(new)


def test_graph_runner_captures_once_per_shape_and_replays():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    acc = GraphCpu()
    runner = GraphRunner(mlp, acc)
    x1, x2, x3 = torch.randn(2, 8), torch.randn(2, 8), torch.randn(5, 8)
    with torch.no_grad():
        y1 = runner(x1).clone()
        y2 = runner(x2)
        torch.testing.assert_close(y1, mlp(x1))
        torch.testing.assert_close(y2, mlp(x2))  # replayed on new inputs copied into the static buffers
        assert runner.captures == 1 and acc.replays == 2
        torch.testing.assert_close(runner(x3), mlp(x3))  # a new shape: a second graph
        assert runner.captures == 2
    assert runner(x1).data_ptr() == y2.data_ptr()  # static output: clone what you keep


def test_graph_runner_runs_eagerly_for_non_tensor_arguments():
    class Takes(nn.Module):
        def forward(self, x, cache):
            return x + len(cache)

    runner = GraphRunner(Takes(), GraphCpu())
    assert torch.equal(runner(torch.zeros(2), [1, 2, 3]), torch.full((2,), 3.0))
    assert runner.eager_calls == 1 and runner.captures == 0


def test_enable_cuda_graph_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="cpu accelerator has no graph capture .* remove enable_cuda_graph"):
        shardwise.init_inference(tiny_model("gpt2"), dtype="fp32", enable_cuda_graph=True)
    with pytest.raises(RuntimeError, match="graph capture is not available on the cpu"):
        GraphRunner(nn.Linear(2, 2), CpuAccelerator())


def test_engine_forward_replays_a_graph_with_a_graph_capable_accelerator():
    model = tiny_model("llama")
    ids = prompts()
    ref, _ = reference(model, ids, 1)
    set_accelerator(GraphCpu())
    try:
        engine = shardwise.init_inference(model, dtype="fp32", enable_cuda_graph=True)
        with torch.no_grad():
            first = engine(ids, use_cache=False).logits.clone()
            again = engine(ids.flip(0), use_cache=False).logits
        assert engine._graph.captures == 1 and engine._graph.replays == 2
    finally:
        set_accelerator(None)
    assert rel_err(first, ref) == 0.0
    assert rel_err(again, ref.flip(0)) < 1e-6


# -- the engine at tp=1 -------------------------------------------------------------------------------------------
def test_tp1_engine_from_checkpoint_directory(tmp_path):
    model = tiny_model("qwen2")
    path = save(model, tmp_path)
    ids = prompts()
    ref_logits, ref_tokens = reference(model, ids, 8)
    engine = shardwise.init_inference(checkpoint=str(path), dtype=torch.float32)
    assert engine.mp_world_size == 1 and engine.dtype == torch.float32 and engine.device == torch.device("cpu")
    assert engine.config.model_type == "qwen2"  # attribute lookup falls through to the model
    engine.profile_model_time()
    with torch.no_grad():
        assert torch.equal(engine(ids).logits, ref_logits)
    assert len(engine.model_times()) == 1 and engine.model_times() == []
    assert torch.equal(engine.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), ref_tokens)
    assert not any(p.requires_grad for p in engine.parameters())


def test_tp1_engine_casts_in_place_and_enforces_max_out_tokens():
    model = tiny_model("opt")
    weight = model.lm_head.weight
    engine = shardwise.init_inference(model, dtype=torch.float32, replace_with_kernel_inject=True,
                                      max_out_tokens=10)
    assert engine.module.lm_head.weight is weight  # already fp32 on cpu: no copy
    with pytest.raises(ValueError, match="exceeds max_out_tokens=10"):
        engine.generate(prompts(), max_new_tokens=8)
    half = shardwise.init_inference(tiny_model("opt"), dtype="bf16")  # DeepSpeed's module.half()-style cast
    assert all(p.dtype == torch.bfloat16 for p in half.module.parameters())
    assert half.module.lm_head.weight is half.module.model.decoder.embed_tokens.weight  # still tied


def test_meta_model_without_checkpoint_is_a_clear_error():
    from shardwise.inference import CheckpointError

    with shardwise.OnDevice(device="meta"):
        model = tiny_model("llama")
    with pytest.raises(CheckpointError, match="meta device and no checkpoint was given"):
        shardwise.init_inference(model, dtype="fp32")


@pytest.mark.parametrize("batch", [1, 4])
def test_bf16_head_never_multiplies_an_expanded_weight(batch, tmp_path):
    """generate() feeds the LM head ``hidden[:, -1:, :]`` (not contiguous); without grad-requiring weights torch's
    matmul would run a batched product against the weight expanded per sequence (a copy of batch x the head in
    bf16). The engine makes the head's input contiguous: one matrix product, the same logits."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    engine = shardwise.init_inference(checkpoint=str(save(model, tmp_path)), dtype=torch.bfloat16)
    head = engine.module.get_output_embeddings()
    hidden = torch.randn(batch, 6, head.in_features, dtype=torch.bfloat16)[:, -1:, :]
    assert hidden.stride(0) != hidden.shape[1] * hidden.stride(1)  # (torch calls the batch-1 slice contiguous)
    with torch.no_grad(), torch.profiler.profile() as prof:
        logits = head(hidden)
    names = {e.key for e in prof.key_averages()}
    assert "aten::bmm" not in names and ("aten::mm" in names or "aten::addmm" in names)
    expected = torch.nn.functional.linear(hidden.clone(memory_format=torch.contiguous_format), head.weight)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
