"""``DeepSpeedInferenceConfig``: the keys ``init_inference`` accepts, with DeepSpeed's names, aliases and defaults.

Importable as ``deepspeed.inference.config.DeepSpeedInferenceConfig`` after ``import shardwise as deepspeed``.
``load_inference_config(config, kwargs)`` merges a dict / JSON path with keyword arguments as DeepSpeed does (a
key given both ways with different values is an error) and turns every validation problem into one
``ConfigError`` naming the key, the value and the fix. Deprecated keys are remapped (``mp_size`` ->
``tensor_parallel.tp_size``, ``mpu`` -> ``tensor_parallel.mpu``).

What each key does *here* (no fused kernels, CPU/CUDA/HPU through the accelerator interface) is in each field's
docstring and in docs/inference.md; keys for DeepSpeed features shardwise does not implement (int8 quantization,
ZeRO-Inference, Triton kernels, saving a re-sharded checkpoint) are accepted when they are off and rejected with an
explanation when they are turned on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from shardwise.config import dtypes
from shardwise.config.errors import KIND_CONFLICT, KIND_SOURCE, KIND_UNSUPPORTED, ConfigError, problems_from_validation
from shardwise.config.schema_base import Section
from shardwise.config.sources import read_file
from shardwise.config.support import INFERENCE_FEATURES_REFUSED

_DTYPES = (torch.float16, torch.float32, torch.bfloat16)


def parse_dtype(value: Any) -> torch.dtype:
    """``torch.float16`` / ``"fp16"`` / ``"bfloat16"`` / ... -> a torch dtype (DeepSpeed's spellings)."""
    if isinstance(value, torch.dtype) and value in _DTYPES:
        return value
    if isinstance(value, str) and dtypes.short_name(value, inference=True) is not None:
        return dtypes.torch_dtype(dtypes.short_name(value, inference=True))
    if value in (torch.int8, "int8", "torch.int8"):
        raise ValueError("int8 inference (DeepSpeed's MoQ quantization kernels) is not implemented in shardwise; "
                         "use dtype=torch.bfloat16 or torch.float16")
    raise ValueError(f"dtype {value!r} is not one of fp32/fp16/bf16 (torch dtypes or strings such as 'bf16')")


class _Model(Section):
    """ds_config's block base (typed, unknown keys rejected), unfrozen: validation fills ``tensor_parallel`` in."""

    model_config = ConfigDict(frozen=False, populate_by_name=True, arbitrary_types_allowed=True,
                              validate_assignment=False)


class DeepSpeedTPConfig(_Model):
    """``tensor_parallel`` (alias ``tp``): how the model is split across ranks."""

    enabled: bool = True
    """Turn tensor parallelism on/off (off means tp_size 1)."""
    tp_size: int = Field(1, ge=1)
    """Number of ranks each model is split across (a divisor of the world size; the rest are replicas)."""
    tp_grain_size: int = Field(64, ge=1)
    """Accepted for compatibility. Splits here always fall on whole attention heads; MLP and vocabulary splits are
    as even as possible."""
    mpu: Any = None
    """A Megatron-style model-parallel unit; its model-parallel group becomes the tensor-parallel group."""
    tp_group: Any = None
    """An existing torch ProcessGroup (or shardwise Group) to split over, instead of creating one."""
    vocab_parallel: bool | str = "auto"
    """shardwise extension: split the embedding and LM head along the vocabulary: true, false, or "auto" (split
    when the table has at least 4M elements; see ``autotp.VOCAB_SPLIT_MIN_ELEMENTS``)."""

    @field_validator("vocab_parallel")
    @classmethod
    def _vocab(cls, v: Any) -> Any:
        if v not in (True, False, "auto"):
            raise ValueError('vocab_parallel must be true, false or "auto"')
        return v


class DeepSpeedInferenceConfig(_Model):
    """Every key ``deepspeed.init_inference`` accepts (DeepSpeed 0.19 names, aliases and defaults)."""

    replace_with_kernel_inject: bool = Field(False, alias="kernel_inject")
    """Accepted. shardwise has no fused inference kernels: the model keeps its own modules (split by automatic
    tensor parallelism when tp_size > 1), so numerics equal the single-process model's. ``max_out_tokens`` is
    enforced in generate() when this is true, as DeepSpeed's kernels do."""
    dtype: Any = torch.float16
    """Weights and compute dtype: torch.float16 (DeepSpeed's default), torch.bfloat16 or torch.float32, or strings
    such as "bf16", "fp32"."""
    tensor_parallel: DeepSpeedTPConfig = Field(default_factory=DeepSpeedTPConfig, alias="tp")
    """Tensor-parallel settings (tp_size, mpu, tp_group)."""
    enable_cuda_graph: bool = False
    """Capture the forward pass as a device graph and replay it (CUDA graphs on cuda, HPU graphs on hpu). On the
    cpu accelerator this is an error (no graph capture exists there)."""
    use_triton: bool = False
    """Triton kernels: not implemented (true is an error)."""
    triton_autotune: bool = False
    """Ignored (no Triton kernels)."""
    zero: dict = Field(default_factory=dict)
    """ZeRO-Inference: not implemented (a non-empty section with stage 3 is an error)."""
    triangular_masking: bool = Field(True, alias="tm")
    """Accepted; masking is the model's own."""
    moe: Any = Field(default_factory=dict)
    """Accepted; expert parallelism is not applied at inference (experts are replicated)."""
    keep_module_on_host: bool = False
    """Keep the loaded weights on the host instead of moving them to the accelerator."""
    quant: dict = Field(default_factory=dict)
    """Quantization (MoQ): not implemented (enabled is an error)."""
    checkpoint: str | dict | None = None
    """Weights to load per rank: a Hugging Face directory (safetensors or .bin shards), a weight file, a JSON
    description ``{"type": ..., "checkpoints": [files], "version": 1.0}`` or the same as a dict."""
    base_dir: str = ""
    """Directory relative checkpoint file names are joined to."""
    set_empty_params: bool = False
    """Accepted; parameters missing from the checkpoint are always an error."""
    save_mp_checkpoint_path: str | None = None
    """Saving a re-sharded checkpoint: not implemented (a path is an error)."""
    checkpoint_config: dict = Field(default_factory=dict, alias="ckpt_config")
    """Accepted and ignored."""
    return_tuple: bool = True
    """Accepted; outputs are the model's own."""
    training_mp_size: int = 1
    """Accepted; checkpoints are read in the full (unsplit) layout, whatever degree wrote them."""
    replace_method: str = "auto"
    """Deprecated in DeepSpeed; ignored."""
    injection_policy: dict | None = Field(None, alias="injection_dict")
    """Manual tensor parallelism: ``{BlockClass: ("attn.out_proj", "mlp.fc2")}`` names each block's output
    projections (split by input features, then all-reduced); every other Linear of the block is split by output
    features."""
    injection_policy_tuple: tuple | None = None
    """Accepted for compatibility; use injection_policy."""
    config: Any = Field(None, alias="args")
    """Script arguments or model config (DeepSpeed's ``args``); its ``device`` entry, when present, is the device the
    model is placed on (e.g. "hpu", "cuda:1", "cpu")."""
    max_out_tokens: int = Field(1024, alias="max_tokens", gt=0)
    """Most tokens (prompt + generated) per sequence; enforced by generate() with replace_with_kernel_inject."""
    min_out_tokens: int = Field(1, alias="min_tokens")
    """Accepted."""
    transposed_mode: bool = False
    """Accepted."""
    mp_size: int = Field(1, ge=1)
    """Deprecated: use tensor_parallel.tp_size (remapped)."""
    mpu: Any = None
    """Deprecated: use tensor_parallel.mpu (remapped)."""
    ep_size: int = 1
    """Deprecated (moe.ep_size); ignored."""
    ep_group: Any = Field(None, alias="expert_group")
    """Deprecated; ignored."""
    ep_mp_group: Any = Field(None, alias="expert_mp_group")
    """Deprecated; ignored."""
    moe_experts: list = Field(default_factory=lambda: [1])
    """Deprecated; ignored."""
    moe_type: str = "standard"
    """Deprecated; ignored."""

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> torch.dtype:
        return parse_dtype(v)

    @model_validator(mode="after")
    def _remap_and_check(self) -> DeepSpeedInferenceConfig:
        tp = self.tensor_parallel
        if self.mp_size != 1:
            if tp.tp_size not in (1, self.mp_size):
                raise ValueError(f"mp_size={self.mp_size} (deprecated) conflicts with tensor_parallel.tp_size="
                                 f"{tp.tp_size}; set only tensor_parallel.tp_size")
            tp.tp_size = self.mp_size
        if self.mpu is not None and tp.mpu is None:
            tp.mpu = self.mpu
        if not tp.enabled:
            tp.tp_size = 1
        return self

    @property
    def device(self) -> str | None:
        """The ``device`` named by ``args``/``config``, if any."""
        args = self.config
        value = args.get("device") if isinstance(args, dict) else getattr(args, "device", None)
        return str(value) if value else None


def load_inference_config(config: str | dict | DeepSpeedInferenceConfig | None = None,
                          kwargs: dict[str, Any] | None = None) -> DeepSpeedInferenceConfig:
    """Merge ``config`` (dict, JSON path or config object) with ``kwargs`` (which win) and validate."""
    kwargs = dict(kwargs or {})
    if isinstance(config, DeepSpeedInferenceConfig):
        base = config.model_dump(by_alias=False)
        base["tensor_parallel"] = config.tensor_parallel.model_dump()
    elif config is None:
        base = {}
    elif isinstance(config, (str, Path)):
        base = read_file(str(config))  # ds_config's reader: JSON or hjson, errors naming the line and the fix
    elif isinstance(config, dict):
        base = dict(config)
    else:
        raise ConfigError(f"'config' must be a dict or a path to a JSON file, got {type(config).__name__}",
                          kind=KIND_SOURCE)
    for key in set(base) & set(kwargs):
        if base[key] != kwargs[key]:
            raise ConfigError(f"'{key}' is given in config ({base[key]!r}) and as a keyword argument "
                              f"({kwargs[key]!r}) with different values; give it once", path=key,
                              kind=KIND_CONFLICT)
    base.update(kwargs)
    try:
        cfg = DeepSpeedInferenceConfig(**base)
    except ValidationError as exc:
        problems = problems_from_validation(exc)
        raise ConfigError.from_problems(problems) from None
    for key, active, why in INFERENCE_FEATURES_REFUSED:
        if active(cfg):
            raise ConfigError(f"{key}: {why}", path=key, kind=KIND_UNSUPPORTED)
    return cfg


def default_inference_config() -> dict[str, Any]:
    """DeepSpeed's ``default_inference_config()``: every key with its default value."""
    return DeepSpeedInferenceConfig().model_dump()
