"""What the planner builds: the LLaMA reference model at published shapes, a Hugging Face config, or a user factory.

``resolve_model(text)`` turns the ``--model`` argument into a ``ModelSource``:

* a preset name (``llama-7b``, ``llama-70b``, ``llama-405b``, ``llama3-8b``, ...): ``shardwise.models.Llama`` at the
  published shape (LLaMA-1/2 7B, Llama-2 70B, Llama-3.1 8B/70B/405B);
* a path to a Hugging Face ``config.json`` (or a folder holding one): LLaMA-family configs (``llama``, ``mistral``)
  become the reference model at that shape, so tensor, pipeline and sequence parallelism apply; any other
  architecture is built with ``transformers.AutoModelForCausalLM.from_config`` (data parallelism and ZeRO only);
* ``package.module:function``: ``function(topology)`` returns an ``nn.Module`` whose ``forward(tokens, targets)``
  returns the loss (the reference model's convention); data parallelism and ZeRO only.

``ModelSource.build(topology, ...)`` constructs this rank's part on the meta device (inside ``fake_world``):
the plain model, or, with pipeline stages, this stage's ``PipelineModule`` of ``shardwise.models.llama_pipe``.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from shardwise.models.llama import LlamaConfig

if TYPE_CHECKING:
    from shardwise.comm.topology import Topology


#: published shapes (vocabulary, hidden, layers, heads, key/value heads, SwiGLU hidden)
PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": LlamaConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_hidden=11008),
    "llama-13b": LlamaConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, ffn_hidden=13824),
    "llama-70b": LlamaConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672),
    "llama3-8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                             rope_theta=500000.0),
    "llama3-70b": LlamaConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672,
                              rope_theta=500000.0),
    "llama-405b": LlamaConfig(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                              ffn_hidden=53248, rope_theta=500000.0),
    # small shapes for tests and quick looks
    "llama-tiny": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96),
    "llama-small": LlamaConfig(vocab_size=1024, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=640),
}
ALIASES = {"llama2-7b": "llama-7b", "llama2-13b": "llama-13b", "llama2-70b": "llama-70b", "llama3.1-8b": "llama3-8b",
           "llama3.1-70b": "llama3-70b", "llama3.1-405b": "llama-405b", "llama3-405b": "llama-405b"}
_HF_LLAMA_TYPES = ("llama", "mistral")


class ModelSpecError(ValueError):
    """The ``--model`` argument names nothing the planner can build; the message lists what it accepts."""


@dataclass(frozen=True)
class ModelSource:
    """A model the planner can build on the meta device, with the shape the activation formula needs."""

    name: str
    llama: LlamaConfig | None = None  # the reference model's shape (None: activations are not estimated)
    hf_config: Any = None  # a transformers config for non-LLaMA architectures
    factory: Callable[[Any], nn.Module] | None = None

    @property
    def supports_model_parallel(self) -> bool:
        """Tensor, pipeline and sequence parallelism need the reference model."""
        return self.llama is not None

    def parameters(self) -> int | None:
        """Parameter count of the whole model (known shapes only)."""
        return llama_parameters(self.llama) if self.llama is not None else None

    def build(self, topology: Topology, *, seq_len: int, checkpointing: bool, sequence_parallel: bool,
              virtual_stages: int) -> nn.Module:
        """This rank's model on the meta device (a ``PipelineModule`` stage when the topology has stages)."""
        with torch.device("meta"):
            if self.llama is not None:
                cfg = replace(self.llama, max_seq_len=seq_len, sequence_parallel=sequence_parallel,
                              checkpoint_activations=checkpointing)
                if topology.size("pp") > 1:
                    return _pipeline_llama(cfg, topology, checkpointing, virtual_stages)
                from shardwise.models.llama import Llama

                return Llama(cfg, topology)
            if self.hf_config is not None:
                return _HFCausalLM(self.hf_config)
            return self.factory(topology)


def _pipeline_llama(cfg: LlamaConfig, topology: Topology, checkpointing: bool, virtual_stages: int) -> nn.Module:
    from shardwise.models.llama_pipe import LlamaPipeLoss, llama_pipe_specs
    from shardwise.pipe import PipelineModule

    return PipelineModule(llama_pipe_specs(replace(cfg, checkpoint_activations=False), topology), topology=topology,
                          loss_fn=LlamaPipeLoss(topology), partition_method="type:BlockPipe",
                          activation_checkpoint_interval=1 if checkpointing else 0, virtual_stages=virtual_stages,
                          checkpointable_layers=["BlockPipe"])  # not the embedding: its input is integer tokens


def llama_parameters(c: LlamaConfig) -> int:
    """Parameters of the reference model: embedding and LM head, blocks (two norms, Q|K|V, output, SwiGLU), norm."""
    per_block = 2 * c.dim + c.dim * (c.n_heads + 2 * c.kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim \
        + 3 * c.dim * c.hidden
    return 2 * c.vocab_size * c.dim + c.n_layers * per_block + c.dim


class _HFCausalLM(nn.Module):
    """A transformers causal LM with the reference model's ``forward(tokens, targets) -> loss``."""

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_config(hf_config)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def llama_from_hf(cfg: dict[str, Any]) -> LlamaConfig:
    """The reference model's shape for a LLaMA-family ``config.json``."""
    heads = int(cfg["num_attention_heads"])
    return LlamaConfig(vocab_size=int(cfg["vocab_size"]), dim=int(cfg["hidden_size"]),
                       n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
                       n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       ffn_hidden=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                       rope_theta=float(cfg.get("rope_theta", 10000.0)))


def _from_hf_path(path: str) -> ModelSource:
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    with open(file) as f:
        raw = json.load(f)
    kind = raw.get("model_type", "")
    name = os.path.basename(os.path.dirname(os.path.abspath(file))) or file
    if kind in _HF_LLAMA_TYPES:
        try:
            return ModelSource(f"{name} ({kind})", llama=llama_from_hf(raw))
        except KeyError as exc:
            raise ModelSpecError(f"{file}: a {kind} config needs {exc.args[0]!r}") from None
    from transformers import AutoConfig

    return ModelSource(f"{name} ({kind or 'unknown type'})", hf_config=AutoConfig.for_model(**raw))


def _from_factory(text: str) -> ModelSource:
    module_name, _, attr = text.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"--model {text!r}: cannot import {attr!r} from {module_name!r} ({exc})") from None
    if not callable(fn):
        raise ModelSpecError(f"--model {text!r}: {attr} is not callable; give a function(topology) -> nn.Module")
    return ModelSource(text, factory=fn)


def resolve_model(model: str | LlamaConfig | ModelSource) -> ModelSource:
    """A preset name, a config.json path, ``module:function``, a ``LlamaConfig`` or a ``ModelSource``."""
    if isinstance(model, ModelSource):
        return model
    if isinstance(model, LlamaConfig):
        return ModelSource("custom llama", llama=model)
    key = ALIASES.get(model.lower(), model.lower())
    if key in PRESETS:
        return ModelSource(key, llama=PRESETS[key])
    if os.path.exists(model):
        return _from_hf_path(model)
    if ":" in model:
        return _from_factory(model)
    close = difflib.get_close_matches(key, list(PRESETS) + list(ALIASES), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelSpecError(
        f"--model {model!r} is not a preset ({', '.join(PRESETS)}), an existing config.json path, or a "
        f"'package.module:function' factory.{hint}"
    )
