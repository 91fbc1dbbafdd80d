"""``ZeroPolicy``: everything that differs between ZeRO stages and the BF16 optimizer, as data.

The stages share one mechanism (flat buckets, hook-driven reduction, a flat optimizer step); a stage is just a
choice of where gradients accumulate, when they are reduced, and whether state is partitioned:

=================  ===========  ===================  ===================  ===========================
stage              partitioned  gradient storage     reduced              collective
=================  ===========  ===================  ===================  ===========================
0, fp32            no           full, param dtype    at the boundary      all-reduce
0, bf16/fp16       no           full, fp32 master    at the boundary      all-reduce
BF16 optimizer     yes          full, fp32           at the boundary      reduce-scatter + all-gather
1                  yes          full, accum dtype    at the boundary      reduce-scatter + all-gather
2                  yes          own partition only   every micro-step     reduce-scatter + all-gather
3                  yes          own partition only   every micro-step     reduce-scatter; params gathered
=================  ===========  ===================  ===================  ===========================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardwise.config.dtypes import torch_dtype


@dataclass(frozen=True)
class ZeroPolicy:
    """How one engine moves and stores gradients and optimizer state."""

    stage: int
    name: str  # for the log: "ZeRO-1", "BF16 optimizer", ...
    partitioned: bool  # master weights + optimizer state split over the ZeRO group
    reduce_every_micro_step: bool  # stage 2: no full gradient buffer survives a micro-step
    grad_dtype: torch.dtype  # accumulation dtype
    use_master: bool  # an fp32 master copy exists (mixed precision or partitioned)
    overlap_comm: bool  # launch bucket reductions from backward hooks
    use_reduce_scatter: bool  # False: all-reduce, then keep own shard (``reduce_scatter: false``)
    bucket_numel: int
    max_inflight: int  # buckets whose reduction may be in flight at once (bounds staging memory)
    offload_optimizer: bool  # master + optimizer state on the host
    pin_memory: bool
    grads_are_param_views: bool  # p.grad aliases the full buffer (kept, and in the parameters' dtype)
    comm_dtype: torch.dtype | None = None  # communication_data_type: reduce gradients in this dtype
    #: 16-bit master weights (``bf16.bf16_master_weights_and_grads``, ``fp16.fp16_master_weights_and_grads``):
    #: the master partition in the model's dtype instead of fp32; None: fp32 (float64 for float64 models)
    master_dtype: torch.dtype | None = None



def default_bucket_numel(model_numel: int, explicit: int | None) -> int:
    """Bucket size in elements: the config's value when given, else sized for the model.

    DeepSpeed's 5e8-element default means one bucket (no overlap) and a multi-GB staging buffer for small and
    mid-size models. We default to ~1/8 of the model (at least 1M, at most 25M elements: 100 MB in fp32, the same
    order as DDP's 25 MB buckets times the ranks' bandwidth), so backward overlaps several reductions.
    """
    if explicit is not None:
        return max(1, int(explicit))
    return int(min(25_000_000, max(1_000_000, model_numel // 8)))


def make_policy(stage: int, param_dtype: torch.dtype, *, grad_accum_dtype: str | None, bf16_optimizer: bool,
                overlap_comm: bool, reduce_scatter: bool, bucket_numel: int, offload_optimizer: bool,
                pin_memory: bool, comm_dtype: str | None = None, low_precision_master: bool = False) -> ZeroPolicy:
    """Choose the policy for a stage, the model's dtype and the ``data_types.grad_accum_dtype`` setting.

    ``low_precision_master`` (DeepSpeed 0.19's ``*_master_weights_and_grads``, stages 1-3): the master partition and
    the gradients stay in the model's 16-bit dtype (``bf16_optimizer`` must then be off).
    """
    low_precision = param_dtype in (torch.float16, torch.bfloat16)
    if low_precision_master and (not low_precision or stage == 0 or bf16_optimizer):
        raise ValueError(f"16-bit master weights need a 16-bit model at ZeRO stage 1-3 without the BF16 optimizer "
                         f"(got {param_dtype}, stage {stage}, bf16_optimizer={bf16_optimizer})")
    accum = torch_dtype(grad_accum_dtype) or (torch.float32 if bf16_optimizer else param_dtype)
    if low_precision_master:
        accum = param_dtype
    if stage == 0 and bf16_optimizer:
        name, partitioned, every = "BF16 optimizer (ZeRO-1, fp32 gradient accumulation)", True, False
    elif stage == 0:
        name, partitioned, every = ("data parallel (fp16 master weights)" if low_precision else "data parallel"), \
            False, False
    elif stage == 1:
        name = "BF16 optimizer (ZeRO-1, fp32 gradient accumulation)" if bf16_optimizer else "ZeRO-1"
        partitioned, every = True, False
    elif stage == 2:
        name, partitioned, every = "ZeRO-2", True, True
    elif stage == 3:
        name, partitioned, every = "ZeRO-3", True, True
    else:
        raise ValueError(f"zero_optimization.stage must be 0-3, got {stage}")
    policy = ZeroPolicy(
        stage=stage, name=name, partitioned=partitioned, reduce_every_micro_step=every, grad_dtype=accum,
        use_master=low_precision or partitioned or offload_optimizer, overlap_comm=overlap_comm,
        use_reduce_scatter=reduce_scatter, bucket_numel=bucket_numel, max_inflight=4,
        offload_optimizer=offload_optimizer, pin_memory=pin_memory,
        grads_are_param_views=not every and accum == param_dtype, comm_dtype=torch_dtype(comm_dtype),
        master_dtype=param_dtype if low_precision_master else None,
    )
    return policy
