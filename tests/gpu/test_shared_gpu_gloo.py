"""Two ranks sharing the one GPU over gloo: the collectives' CUDA-tensor paths, and ZeRO 1-3 on them.

gloo runs collectives on CUDA tensors by staging them through pinned host buffers (all-reduce, broadcast,
all-gather, reduce-scatter via all-reduce, all-to-all); its point-to-point send/recv takes host memory only, so
pipeline messages are not tried here. Each rank binds device 0 (``LOCAL_RANK=0``), so this runs on a single-GPU
machine. ZeRO parity is stated as in ``tests/distributed/test_zero_stages.py``: the float64 single-process reference
on the global batch, 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import shardwise
from shardwise import comm
from shardwise.accelerator import get_accelerator
from tests.gpu.harness import ACCELERATOR, run_gpu
from tests.models import assert_close_rel, mse_loss, rank_batch, reference_train, tiny_mlp

N = 6  # elements per rank-chunk


def _collectives(dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    dev = get_accelerator().device()
    rank, world = comm.get_rank(), comm.get_world_size()
    base = torch.arange(world * N, dtype=torch.float32)
    out: dict = {"backend": str(dist.get_backend()), "device": str(dev)}

    t = (base + rank).to(dev, dtype)
    comm.all_reduce(t)
    out["all_reduce"] = t

    t = (base + rank).to(dev, dtype)
    comm.broadcast(t, src=1)
    out["broadcast"] = t

    full = torch.empty(world * N, dtype=dtype, device=dev)
    handle = comm.all_gather_into_tensor(full, torch.full((N,), float(rank + 1), device=dev, dtype=dtype),
                                         async_op=True)
    handle.wait()
    out["all_gather_into_tensor"] = full

    part = torch.empty(N, dtype=dtype, device=dev)
    comm.reduce_scatter_tensor(part, (base * (rank + 1)).to(dev, dtype))
    out["reduce_scatter_tensor"] = part

    chunks = [torch.empty(N, dtype=dtype, device=dev) for _ in range(world)]
    comm.all_gather(chunks, torch.full((N,), float(10 * rank), device=dev, dtype=dtype))
    out["all_gather"] = torch.cat(chunks)

    recv = torch.empty(world * N, dtype=dtype, device=dev)
    comm.all_to_all_single(recv, (base + 100 * rank).to(dev, dtype))
    out["all_to_all_single"] = recv

    get_accelerator().synchronize()
    return {k: (v.float().cpu() if torch.is_tensor(v) else v) for k, v in out.items()}


def _expected(rank: int, world: int = 2) -> dict[str, torch.Tensor]:
    base = torch.arange(world * N, dtype=torch.float32)
    return {
        "all_reduce": sum(base + r for r in range(world)),
        "broadcast": base + 1,
        "all_gather_into_tensor": torch.cat([torch.full((N,), float(r + 1)) for r in range(world)]),
        "reduce_scatter_tensor": sum(base * (r + 1) for r in range(world))[rank * N:(rank + 1) * N],
        "all_gather": torch.cat([torch.full((N,), float(10 * r)) for r in range(world)]),
        "all_to_all_single": torch.cat([(base + 100 * r)[rank * N:(rank + 1) * N] for r in range(world)]),
    }


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_collectives_on_cuda_tensors_over_gloo(dtype: str) -> None:
    results = run_gpu(_collectives, dtype, world_size=2, backend="gloo")
    for rank, r in enumerate(results):
        assert r["backend"] == "gloo" and r["device"].startswith(ACCELERATOR), r
        for op, value in _expected(rank).items():
            assert torch.equal(r[op], value), f"rank {rank} {op}: {r[op]} != {value}"


# -- ZeRO on two ranks of one GPU -------------------------------------------------------------------------------------
STEPS, GAS, CLIP = 3, 2, 0.05


def _zero(stage: int) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": GAS, "gradient_clipping": CLIP,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.01}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 200, "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = shardwise.initialize(model=tiny_mlp(seed=0), config=cfg)
    rank, dp = engine.topology.coord("dp"), engine.dp_world_size
    losses = []
    for step in range(STEPS):
        total = torch.zeros((), device=engine.device)
        for micro in range(GAS):
            x, y = (t.to(engine.device) for t in rank_batch(step, rank, micro))
            loss = mse_loss(engine, x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        comm.all_reduce(total)
        losses.append(total.item() / (GAS * dp))
    with shardwise.zero.GatheredParameters(list(engine.module.parameters())):
        weights = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    return {"losses": losses, "weights": weights, "device": {p.device.type for p in engine.module.parameters()}}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_on_two_ranks_sharing_the_gpu(stage: int) -> None:
    results = run_gpu(_zero, stage, world_size=2, backend="gloo")
    ref_losses, ref_weights = reference_train(tiny_mlp(seed=0), STEPS, 2, GAS,
                                              lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01), clip=CLIP)
    for rank, r in enumerate(results):
        assert r["device"] == {ACCELERATOR}
        assert_close_rel(r["losses"], ref_losses, what=f"rank {rank} losses")
        for name, value in ref_weights.items():
            assert_close_rel(r["weights"][name], value, what=f"rank {rank} {name}")
