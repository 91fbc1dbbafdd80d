"""The shared-memory collectives of tensor-parallel inference against plain sums, and the torch.distributed path."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist import run_ranks
from tests.inference_models import prompts, reference, rel_err, save, tiny_model


def _shm(world: int) -> dict:
    from shardwise.accelerator import get_accelerator
    from shardwise.comm.topology import Topology
    from shardwise.inference.collectives import SharedMemoryCollectives, make_collectives

    group = Topology(tp=world).tp_group
    auto = make_collectives(group, get_accelerator())
    small = SharedMemoryCollectives(group, slot_bytes=256)  # 64 floats per round: forces chunking
    rank = dist.get_rank()
    out = {"kind": auto.kind}
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(3, 50, generator=g)  # 150 floats: 3 rounds through the small segment
    everyone = [torch.randn(3, 50, generator=torch.Generator().manual_seed(r)) for r in range(world)]
    expected = everyone[0].clone()
    for other in everyone[1:]:
        expected += other
    for name, coll in (("auto", auto), ("small", small)):
        y = x.clone()
        coll.all_reduce_(y)
        out[name] = torch.equal(y, expected)  # rank-order sum: bitwise equal on every rank
        strided = x.clone().t()  # a non-contiguous tensor is reduced in place too
        coll.all_reduce_(strided)
        out[name + "_strided"] = torch.equal(strided, expected.t())
    h = (x * 1000).bfloat16()
    auto.all_reduce_(h)
    wide = sum(((e * 1000).bfloat16().float() for e in everyone), torch.zeros(3, 50))
    out["bf16"] = torch.equal(h, wide.bfloat16())  # fp32 accumulation, one rounding
    sizes = [5 - (r % 2) for r in range(world)]  # uneven vocabulary slices
    local = torch.full((2, 1, sizes[rank]), float(rank))
    gathered = auto.all_gather_last(local, sizes)
    out["gather"] = torch.equal(gathered, torch.cat([torch.full((2, 1, s), float(r)) for r, s in enumerate(sizes)],
                                                    -1))
    out["gather_fallback"] = torch.equal(small.all_gather_last(local.expand(2, 40, -1).contiguous(), sizes),
                                         gathered.expand(2, 40, -1))
    return out


def test_shared_memory_collectives():
    for result in run_ranks(_shm, 2, world_size=2, timeout=60):
        assert result["kind"] == "shared memory"
        assert all(v for k, v in result.items() if k != "kind"), result


def _gloo(path: str, ids: torch.Tensor) -> tuple:
    import shardwise

    engine = shardwise.init_inference(checkpoint=path, tensor_parallel={"tp_size": 2}, dtype="fp32")
    row = engine.module.transformer.h[0].self_attention.dense
    with torch.no_grad():
        return engine(ids).logits, row.collectives.kind


def test_torch_distributed_path_when_shared_memory_is_off(tmp_path):
    model = tiny_model("bloom")
    path = save(model, tmp_path)
    ids = prompts()
    ref, _ = reference(model, ids, 1)
    for logits, kind in run_ranks(_gloo, str(path), ids, world_size=2, timeout=60,
                                  env={"SHARDWISE_INFERENCE_SHM": "0"}):
        assert kind == "torch.distributed" and rel_err(logits, ref) <= 1e-5
