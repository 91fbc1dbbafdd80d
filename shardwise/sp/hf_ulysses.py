"""Ulysses sequence parallelism around a Hugging Face model's own attention (DeepSpeed's ``UlyssesSPAttentionHF``).

Every rank of the sequence-parallel group runs the unmodified model on its shard of the sequence: embeddings, norms,
MLPs and projections are per token and need nothing. Only the core attention needs the whole sequence, so the
wrapper installed in transformers' attention registry (``ALL_ATTENTION_FUNCTIONS``, see ``hf_registry``) turns
this rank's ``[b, heads, s/P, d]`` query/key/value into ``[b, heads/P, s, d]`` with one all-to-all each (the
differentiable ``seq_all_to_all`` of ``shardwise.sp.ulysses``), calls the model's own attention function (``sdpa`` or
``eager``) on the full sequence of its heads with the full-sequence mask (``hf_masks``), and turns the context back
into the sequence shard with a fourth all-to-all. Backward is the reverse all-to-alls.

Heads (``plan_heads``): query heads are split as evenly as possible over the P ranks. Key/value heads must land on
the rank of the query heads that read them: when ``kv_heads`` divides by P each rank takes its slice; when P is a
multiple of ``kv_heads`` the key/value heads are first repeated ``P / kv_heads`` times so each rank gets the one its
queries need (DeepSpeed's replication); otherwise (uneven splits) they are repeated up to the query heads. The
module's ``num_key_value_groups`` is set to the local ratio for the duration of the call.

Positions: ``position_ids`` must be the global positions of the shard (the data loader adapter provides them; the
model pre-hook of ``hf_registry`` injects ``rank * s/P + arange(s/P)`` when none are given) so rotary embeddings,
computed before attention, are right; after the exchange the attention sees the gathered full positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from math import gcd
from typing import Any

import torch
from torch import nn

from shardwise.sp import hf_masks, hf_registry
from shardwise.sp.hf_attention import model_eager_function
from shardwise.sp.hf_masks import FullSequence
from shardwise.sp.ulysses import seq_all_to_all
from shardwise.tp.mappings import all_gather_dim, resolve_group
from shardwise.tp.partition import partition_sizes


@dataclass(frozen=True)
class HeadPlan:
    """How query and key/value heads are split over the sequence-parallel ranks."""

    q_sizes: tuple[int, ...]
    """query heads per rank"""
    kv_sizes: tuple[int, ...]
    """key/value heads per rank, after repetition"""
    kv_repeat: int
    """each key/value head is repeated this many times (interleaved) before the all-to-all"""
    local_groups: int
    """query heads per key/value head on every rank (the module's ``num_key_value_groups`` during the call)"""


def plan_heads(heads: int, kv_heads: int, sp: int) -> HeadPlan:
    """Split ``heads`` query and ``kv_heads`` key/value heads over ``sp`` ranks so queries find their keys locally."""
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"attention with {heads} query heads and {kv_heads} key/value heads: the query heads must be "
                         "a multiple of the key/value heads")
    if heads % sp == 0:
        repeat = sp // gcd(kv_heads, sp)  # the fewest copies that make the key/value heads divide by sp
        if heads % (kv_heads * repeat) == 0:
            kv = kv_heads * repeat
            return HeadPlan((heads // sp,) * sp, (kv // sp,) * sp, repeat, heads // kv)
    # uneven query split: give every query head its own key/value head
    sizes = tuple(partition_sizes(heads, sp))
    return HeadPlan(sizes, sizes, heads // kv_heads, 1)


@contextlib.contextmanager
def _kv_groups(module: nn.Module, groups: int) -> Iterator[None]:
    """Temporarily set ``module.num_key_value_groups`` (read by transformers' eager and sdpa functions)."""
    old = getattr(module, "num_key_value_groups", None)
    if old == groups:
        yield
        return
    module.num_key_value_groups = groups
    try:
        yield
    finally:
        if old is None:
            del module.num_key_value_groups
        else:
            module.num_key_value_groups = old


class UlyssesSPAttentionHF(nn.Module):
    """Sequence-parallel wrapper of a transformers attention function (DeepSpeed 0.19's class and arguments).

    ``attn``: the core function ``(module, q, k, v, mask, **kw) -> (context [b, s, h, d], weights)``, e.g.
    ``ALL_ATTENTION_FUNCTIONS["sdpa"]``; ``None`` means each architecture's own eager function. Shapes in and out
    are transformers' (``[batch, heads, seq/P, head_dim]`` in, ``[batch, seq/P, heads, head_dim]`` out).
    ``batch_size`` and ``num_hidden_layers`` are accepted for DeepSpeed compatibility (the batch may vary).
    With ``seq_length_is_variable=False``, every shard must hold ``global_seq_length / P`` tokens.
    ``disable_in_eval``: in ``eval()`` mode call ``attn`` unchanged (unsharded evaluation data).
    Usually built by ``register_with_transformers``, which also installs the model pre-hook that gathers the
    batch's positions and padding mask (``sequence``); without it, positions come from the ``position_ids`` that
    reach the attention (gathered here) and no padding mask is known.
    """

    def __init__(self, attn: Callable | None, batch_size: int, attn_head_count: int, attn_head_size: int,
                 kv_head_count: int, num_hidden_layers: int, process_group: Any, seq_length_is_variable: bool = False,
                 local_seq_length: int | None = None, global_seq_length: int | None = None,
                 disable_in_eval: bool = False) -> None:
        super().__init__()
        self.attn = attn
        self.group = resolve_group(process_group)
        self.world_size = self.group.size
        self.sp_rank = self.group.rank
        self.batch_size, self.num_hidden_layers = batch_size, num_hidden_layers
        self.attn_head_count, self.attn_head_size, self.global_kv_head_count = (
            attn_head_count, attn_head_size, kv_head_count)
        self.plan = plan_heads(attn_head_count, kv_head_count, self.world_size)
        self.seq_length_is_variable = seq_length_is_variable
        if not seq_length_is_variable and global_seq_length is not None:
            if global_seq_length % self.world_size:
                raise ValueError(f"seq_length {global_seq_length} is not divisible by the sequence-parallel size "
                                 f"{self.world_size}; pad the sequences to a multiple of it or set "
                                 "seq_length_is_variable=True")
            local_seq_length = global_seq_length // self.world_size
        self.local_seq_length, self.global_seq_length = local_seq_length, global_seq_length
        self.disable_in_eval = disable_in_eval
        self.core_attn_implementation: str | None = None  # set by register_with_transformers
        #: the current batch's full-sequence facts, set by the model pre-hook (hf_registry) once per forward
        self.sequence: FullSequence | None = None
        self._gathered: tuple[Any, FullSequence] | None = None
        self._masks: tuple[FullSequence, dict[tuple, torch.Tensor | None]] | None = None

    # -- the current batch ------------------------------------------------------------------------------------------
    def _full_sequence(self, kwargs: dict[str, Any]) -> FullSequence:
        """The batch facts of this forward: the pre-hook's, or (without it) gathered from ``position_ids``."""
        local = kwargs.get("position_ids")
        seq = self.sequence
        if seq is not None and (local is None or local is seq.local_position_ids):
            return seq
        if local is None:
            return FullSequence(None, None)
        if self._gathered is not None and self._gathered[0] is local:
            return self._gathered[1]  # one all-gather per forward, not per layer
        full = all_gather_dim(local.contiguous(), self.group, dim=-1)
        seq = FullSequence(full, None, local_position_ids=local)
        self._gathered = (local, seq)
        return seq

    def _full_mask(self, seq: FullSequence, length: int, window: int | None, query: torch.Tensor) -> Any:
        """The full-sequence mask for this backend, built once per forward and shared by the layers."""
        eager = self.core_attn_implementation in (None, "eager")
        if self._masks is None or self._masks[0] is not seq:
            self._masks = (seq, {})  # a new batch: drop the previous batch's masks
        cache = self._masks[1]
        key = (length, window, eager, query.dtype, query.device)  # layers may differ in window (e.g. Qwen2)
        if key not in cache:
            cache[key] = (hf_masks.eager_mask(seq, length, window, query.device, query.dtype) if eager
                          else hf_masks.sdpa_mask(seq, length, window, query.device))
        return cache[key]

    def _core(self, module: nn.Module) -> Callable:
        return self.attn if self.attn is not None else model_eager_function(module)

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """transformers' attention-function signature; see the class docstring."""
        if self.world_size == 1 or (self.disable_in_eval and not module.training):
            return self._core(module)(module, query, key, value, attention_mask, *args, **kwargs)
        self._check(query, key)
        plan, group = self.plan, self.group
        if plan.kv_repeat > 1:
            key, value = (t.repeat_interleave(plan.kv_repeat, dim=1) for t in (key, value))
        q = seq_all_to_all(query, group, 1, 2, plan.q_sizes)  # [b, h/P, s, d]: scatter heads, gather sequence
        k, v = (seq_all_to_all(t, group, 1, 2, plan.kv_sizes) for t in (key, value))
        seq = self._full_sequence(kwargs)
        mask = self._full_mask(seq, q.shape[2], kwargs.get("sliding_window"), q)
        if seq.position_ids is not None:
            kwargs["position_ids"] = seq.position_ids
        with _kv_groups(module, plan.local_groups):
            context, weights = self._core(module)(module, q, k, v, mask, *args, **kwargs)
        # context [b, s, h/P, d] -> [b, s/P, h, d]: scatter the sequence, gather the heads
        return seq_all_to_all(context, group, 1, 2, None, plan.q_sizes), weights

    def _check(self, query: torch.Tensor, key: torch.Tensor) -> None:
        heads, kv, local = query.shape[1], key.shape[1], query.shape[2]
        if heads != self.attn_head_count or kv != self.global_kv_head_count:
            raise ValueError(f"Ulysses attention was set up for {self.attn_head_count} query / "
                             f"{self.global_kv_head_count} key-value heads but got {heads} / {kv}: register it for "
                             "the model being trained (register_with_transformers(model, ...))")
        if not self.seq_length_is_variable and self.local_seq_length is not None and local != self.local_seq_length:
            raise ValueError(f"a sequence shard of {local} tokens, but seq_length={self.global_seq_length} over "
                             f"{self.world_size} ranks means {self.local_seq_length}; pass seq_length_is_variable=True "
                             "for batches of varying length")

    # -- registration (DeepSpeed's classmethods; the machinery lives in hf_registry) ---------------------------------
    @classmethod
    def register_with_transformers(cls, model_name_or_path: Any, core_attn_implementation: str,
                                   sequence_parallel_size: int, micro_batch_size: int, seq_length: int | None = None,
                                   seq_length_is_variable: bool = True, disable_in_eval: bool = False,
                                   max_length: int | None = None) -> Any:
        """Make ``core_attn_implementation`` sequence-parallel for this model; returns the mpu (None when size 1).

        See ``shardwise.sp.hf_registry.register_with_transformers``."""
        return hf_registry.register_with_transformers(
            model_name_or_path, core_attn_implementation, sequence_parallel_size, micro_batch_size,
            seq_length=seq_length, seq_length_is_variable=seq_length_is_variable, disable_in_eval=disable_in_eval,
            max_length=max_length, cls=cls)

    @classmethod
    def unregister_from_transformers(cls, core_attn_implementation: str | None = None) -> None:
        """Restore transformers' attention function and remove the model hook."""
        hf_registry.unregister_from_transformers(core_attn_implementation)
