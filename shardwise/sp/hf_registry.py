"""``register_with_transformers``: install Ulysses in transformers' attention registry for one model.

transformers looks every attention function up by name in one process-wide table (``ALL_ATTENTION_FUNCTIONS``;
``eager`` falls back to each modeling file's own function when the table has no entry). Registering replaces the
entry for the model's implementation (``sdpa`` or ``eager``) with a wrapper that runs ``UlyssesSPAttentionHF`` for the
registered model's attention modules and the original function for any other module, so transformers still takes
every backend-specific branch it takes for that name (mask creation included). Because the table is process-wide,
one registration is active at a time, as in DeepSpeed; ``unregister_from_transformers`` restores the table.

Given the model object (not a hub name), a forward pre-hook on it gathers the batch's facts once per forward (the
shard lengths, checked equal; the global ``position_ids``, injected when absent; the 2D padding mask) so that the
wrapper can rebuild the full-sequence mask, and turns the KV cache off (a cache of sequence shards is meaningless).

The process group comes from a ``Topology(sp=...)`` (the only creator of groups); the returned mpu is a
``ModelParallelUnit`` over it, which ``deepspeed.initialize(mpu=...)`` turns back into that same topology.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from shardwise.comm.group import Group
from shardwise.comm.topology import Topology
from shardwise.common.logging import logger
from shardwise.sp.hf_attention import SUPPORTED_IMPLEMENTATIONS, model_eager_function
from shardwise.sp.hf_masks import FullSequence
from shardwise.tp.mappings import all_gather_dim
from shardwise.tp.mpu import ModelParallelUnit

if TYPE_CHECKING:  # the wrapper class calls into this module; the class itself is passed in as ``cls``
    from shardwise.sp.hf_ulysses import UlyssesSPAttentionHF


@dataclass
class _Registration:
    implementation: str
    previous: Callable | None  # what the registry returned for the name before (None: no entry)
    wrapper: Callable
    attention: UlyssesSPAttentionHF
    mpu: ModelParallelUnit
    hooks: list[Any]  # RemovableHandles of the model hooks


_ACTIVE: _Registration | None = None


def active_mpu() -> ModelParallelUnit | None:
    """The mpu of the active registration (its ``get_sequence_parallel_group()`` etc.), or None."""
    return _ACTIVE.mpu if _ACTIVE is not None else None


def _registry() -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


def _model_and_config(model_name_or_path: Any) -> tuple[nn.Module | None, Any]:
    if hasattr(model_name_or_path, "config"):
        model = model_name_or_path if isinstance(model_name_or_path, nn.Module) else None
        return model, model_name_or_path.config
    from transformers import AutoConfig

    return None, AutoConfig.from_pretrained(model_name_or_path)


def _check_arguments(core: str, sp: int, seq_length: int | None, variable: bool, config: Any) -> None:
    if core not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(f"core_attn_implementation={core!r} is not supported by shardwise's Ulysses; choose one of "
                         f"{list(SUPPORTED_IMPLEMENTATIONS)} (and load the model with the same attn_implementation)")
    model_impl = getattr(config, "_attn_implementation", None)
    if model_impl is not None and model_impl != core:
        raise ValueError(f"core_attn_implementation={core!r} but the model was loaded with attn_implementation="
                         f"{model_impl!r}; use the same value for both (e.g. from_pretrained(..., "
                         f"attn_implementation={core!r}))")
    if not variable and seq_length is None:
        raise ValueError("seq_length_is_variable=False needs seq_length (the fixed global sequence length)")
    if not dist.is_initialized():
        raise RuntimeError("register_with_transformers needs torch.distributed: call deepspeed.init_distributed() "
                           "(shardwise.init_distributed()) first")
    if _ACTIVE is not None:
        raise RuntimeError("Ulysses is already registered with transformers in this process; call "
                           "UlyssesSPAttentionHF.unregister_from_transformers() before registering another model")
    if sp < 1:
        raise ValueError(f"sequence_parallel_size must be >= 1, got {sp}")


def register_with_transformers(model_name_or_path: Any, core_attn_implementation: str | None,
                               sequence_parallel_size: int,
                               micro_batch_size: int, *, seq_length: int | None = None,
                               seq_length_is_variable: bool = True, disable_in_eval: bool = False,
                               max_length: int | None = None,
                               cls: type[UlyssesSPAttentionHF]) -> ModelParallelUnit | None:
    """Make ``core_attn_implementation`` ("sdpa" or "eager"; None means "sdpa", the default accelerate documents
    for ``sp_attn_implementation``) sequence-parallel for this model; returns the mpu.

    ``model_name_or_path``: the model (preferred: its pre-hook handles positions and padding masks) or a local
    path/config holder. Returns None (and does nothing) when ``sequence_parallel_size`` is 1, as DeepSpeed.
    ``max_length`` is DeepSpeed's deprecated name for ``seq_length``.
    """
    global _ACTIVE
    if sequence_parallel_size == 1:
        return None
    if max_length is not None:
        logger.warning("register_with_transformers: max_length is deprecated, use seq_length")
        seq_length = seq_length if seq_length is not None else max_length
    model, config = _model_and_config(model_name_or_path)
    if core_attn_implementation is None:  # accelerate's DeepSpeedSequenceParallelConfig unset: its documented default
        core_attn_implementation = "sdpa"
        logger.info("register_with_transformers: core_attn_implementation not given (accelerate: "
                    "sp_attn_implementation unset); using 'sdpa'")
    _check_arguments(core_attn_implementation, sequence_parallel_size, seq_length, seq_length_is_variable, config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    topology = Topology(sp=sequence_parallel_size)
    registry = _registry()
    original = registry["sdpa"] if core_attn_implementation == "sdpa" else None
    attention = cls(original, micro_batch_size, heads, head_dim, kv_heads, getattr(text, "num_hidden_layers", 0),
                    topology.sp_group, seq_length_is_variable=seq_length_is_variable,
                    global_seq_length=None if seq_length_is_variable else seq_length,
                    disable_in_eval=disable_in_eval)
    attention.core_attn_implementation = core_attn_implementation
    owned = {id(m) for m in model.modules()} if model is not None else None

    def ulysses_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
        if owned is not None and id(module) not in owned:  # another model in this process: untouched
            core = original or model_eager_function(module)
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        return attention(module, query, key, value, attention_mask, *args, **kwargs)

    previous = registry.get(core_attn_implementation)
    registry[core_attn_implementation] = ulysses_attention
    hooks = _install_batch_hooks(attention, model) if model is not None else []
    mpu = ModelParallelUnit(topology)
    _ACTIVE = _Registration(core_attn_implementation, previous, ulysses_attention, attention, mpu, hooks)
    return mpu


def unregister_from_transformers(core_attn_implementation: str | None = None) -> None:
    """Restore the attention registry's entry and remove the model hook (no-op when nothing is registered)."""
    global _ACTIVE
    reg = _ACTIVE
    if reg is None:
        return
    if core_attn_implementation is not None and core_attn_implementation != reg.implementation:
        raise ValueError(f"Ulysses is registered for {reg.implementation!r}, not {core_attn_implementation!r}")
    registry = _registry()
    if registry.get(reg.implementation) is reg.wrapper:
        del registry[reg.implementation]  # drops our override; the library-wide entry shows again
        if reg.previous is not None and registry.get(reg.implementation) is not reg.previous:
            registry[reg.implementation] = reg.previous
    for handle in reg.hooks:
        handle.remove()
    _ACTIVE = None


# -- the model pre-hook: the batch's full-sequence facts, once per forward --------------------------------------------
def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (a ``**kwargs`` parameter flattened)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    out: dict[str, Any] = {}
    for name, value in bound.items():
        param = signature.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError("Ulysses: the model's forward takes *args; pass its inputs by keyword")
        else:
            out[name] = value
    return out


def _hooked_models(model: nn.Module) -> list[nn.Module]:
    """The transformers models inside ``model`` that take ``position_ids`` (a causal-LM and its base model: the
    base model is also called on its own, e.g. for the tiled loss), or the model itself."""
    from transformers import PreTrainedModel

    found = [m for m in model.modules() if isinstance(m, PreTrainedModel)
             and "position_ids" in inspect.signature(m.forward).parameters]
    return found or [model]


def _install_batch_hooks(attention: UlyssesSPAttentionHF, model: nn.Module) -> list[Any]:
    """Pre-hooks gathering the batch facts at the outermost hooked model call (inner calls see them already)."""
    depth = [0]
    handles = []
    for m in _hooked_models(model):
        handles.append(m.register_forward_pre_hook(_batch_hook(attention, m, depth), with_kwargs=True))
        handles.append(m.register_forward_hook(_leave(depth), always_call=True))
    return handles


def _leave(depth: list[int]) -> Callable:
    def post_forward(module: nn.Module, args: tuple, output: Any) -> None:
        depth[0] -= 1

    return post_forward


def _batch_hook(attention: UlyssesSPAttentionHF, model: nn.Module, depth: list[int]) -> Callable:
    signature = inspect.signature(model.forward)
    takes_cache_flag = "use_cache" in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())

    def pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        depth[0] += 1
        if depth[0] > 1:  # inside an outer hooked model: the outer call gathered this batch
            return None
        if attention.world_size == 1 or (attention.disable_in_eval and not module.training):
            attention.sequence = None
            return None
        arguments = _bind(signature, args, kwargs)
        attention.sequence, arguments["position_ids"] = gather_batch(attention.group, arguments)
        if takes_cache_flag:
            arguments["use_cache"] = False
        return (), arguments

    return pre_forward


def gather_batch(group: Group, arguments: dict[str, Any]) -> tuple[FullSequence, torch.Tensor]:
    """Every rank's shard facts gathered: returns the full-sequence facts and this shard's global position ids."""
    ref = arguments.get("input_ids")
    ref = ref if ref is not None else arguments.get("inputs_embeds")
    if ref is None:
        raise ValueError("Ulysses: the model was called without input_ids or inputs_embeds")
    mask, pos = arguments.get("attention_mask"), arguments.get("position_ids")
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"Ulysses: a {mask.dim()}D attention_mask cannot be gathered over the sequence shards; pass "
                         "the 2D [batch, seq] padding mask (or none) and let the model build its own")
    batch, length = ref.shape[:2]
    facts = torch.tensor([[length, batch, mask is not None, pos is not None, 0 if pos is None else pos.shape[0]]])
    every = all_gather_dim(facts, group, dim=0)
    if not bool((every == every[0]).all()):
        raise ValueError(f"Ulysses: the ranks of sequence-parallel group {list(group.ranks)} got different shards "
                         f"([length, batch, has mask, has positions, position rows] per rank: {every.tolist()}); "
                         "each must get its equal-length shard of the same batch (UlyssesSPDataLoaderAdapter pads "
                         "sequences to a multiple of the group size)")
    if pos is None:
        pos = (group.rank * length + torch.arange(length, device=ref.device)).unsqueeze(0).expand(batch, -1)
    full_pos = all_gather_dim(pos.contiguous(), group, dim=-1)
    padding = None
    if mask is not None:
        full = all_gather_dim(mask.to(torch.int32).contiguous(), group, dim=-1).bool()
        padding = None if bool(full.all()) else full
    return FullSequence(full_pos, padding, mask_given=mask is not None, local_position_ids=pos), pos
