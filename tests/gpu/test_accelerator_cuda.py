"""The cuda accelerator itself: how it is chosen, what it reports, memory and pinning, streams, RNG state, graph
capture, and ``init_distributed`` on one rank (nccl, the accelerator's backend)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from shardwise import comm
from shardwise.accelerator import AcceleratorError, get_accelerator, set_accelerator
from tests.gpu.harness import ACCELERATOR, REHEARSAL, run_gpu

MB = 2**20


@pytest.mark.cuda_only
@pytest.mark.parametrize("how", ["detection", "SHARDWISE_ACCELERATOR", "DS_ACCELERATOR"])
def test_cuda_is_chosen_by_detection_and_by_name(monkeypatch, how: str) -> None:
    from shardwise.accelerator.cuda import CudaAccelerator

    for var in ("SHARDWISE_ACCELERATOR", "DS_ACCELERATOR"):
        monkeypatch.delenv(var, raising=False)
    if how != "detection":
        monkeypatch.setenv(how, "cuda")
    set_accelerator(None)
    try:
        acc = get_accelerator()
        assert isinstance(acc, CudaAccelerator)
        assert acc.communication_backend_name() == "nccl"
        assert acc.visible_devices_envs() == ["CUDA_VISIBLE_DEVICES"]
    finally:
        set_accelerator(None)


@pytest.mark.cuda_only
def test_device_properties(accelerator) -> None:
    acc = accelerator
    assert acc.is_available() and acc.device_count() >= 1
    index = acc.current_device()
    assert acc.device() == torch.device("cuda", index)
    assert acc.device_name() == "cuda" and acc.current_device_name() == f"cuda:{index}"
    assert acc.total_memory() == torch.cuda.get_device_properties(index).total_memory > 0
    assert acc.supports_graph_capture()
    # an H100/H200 computes in both 16-bit formats
    assert {torch.bfloat16, torch.float16} <= set(acc.supported_dtypes())
    assert acc.on_accelerator(torch.zeros(1, device=acc.device()))
    assert not acc.on_accelerator(torch.zeros(1))


@pytest.mark.cuda_only
def test_set_device_beyond_the_visible_devices_is_a_clear_error(accelerator) -> None:
    with pytest.raises(AcceleratorError, match=r"device index \d+ .* CUDA_VISIBLE_DEVICES"):
        accelerator.set_device(accelerator.device_count())


@pytest.mark.cuda_only
def test_memory_counters_follow_allocations(accelerator) -> None:
    acc = accelerator
    acc.synchronize()
    acc.empty_cache()
    acc.reset_peak_memory_stats()
    before = acc.memory_allocated()
    x = torch.empty(64 * MB, dtype=torch.uint8, device=acc.device())
    assert acc.memory_allocated() - before == 64 * MB
    assert acc.max_memory_allocated() >= before + 64 * MB
    stats = acc.memory_stats()
    assert stats["reserved_bytes"] >= stats["allocated_bytes"] >= 64 * MB
    del x
    assert acc.memory_allocated() == before
    acc.empty_cache()
    acc.reset_peak_memory_stats()
    assert acc.max_memory_allocated() == before


@pytest.mark.cuda_only
def test_pinned_host_copies(accelerator) -> None:
    acc = accelerator
    host = torch.arange(1000, dtype=torch.float32)
    pinned = acc.pin_memory(host)
    assert acc.is_pinned(pinned) and not acc.is_pinned(host)
    assert acc.pin_memory(pinned).data_ptr() == pinned.data_ptr()  # already pinned: no second copy
    assert torch.equal(pinned, host)
    on_device = pinned.to(acc.device(), non_blocking=True)
    acc.synchronize()
    assert torch.equal(on_device.cpu(), host)


@pytest.mark.cuda_only
def test_side_stream_and_event_order_work(accelerator) -> None:
    acc = accelerator
    x = torch.randn(1024, 1024, device=acc.device())
    side = acc.Stream()
    side.wait_stream(acc.current_stream())
    done = acc.Event()
    with acc.stream(side):
        y = x @ x
        done.record(side)
    acc.current_stream().wait_event(done)
    z = y + 1
    acc.synchronize()
    assert done.query()
    torch.testing.assert_close(z, x @ x + 1)
    assert acc.default_stream() == torch.cuda.default_stream()


@pytest.mark.cuda_only
def test_rng_state_round_trip(accelerator) -> None:
    acc = accelerator
    acc.manual_seed(5)
    state = acc.get_rng_state()
    assert state.device.type == "cpu" and state.dtype == torch.uint8
    first = torch.rand(8, device=acc.device())
    acc.set_rng_state(state)
    again = torch.rand(8, device=acc.device())
    assert torch.equal(first, again)
    gen = acc.default_generator(acc.current_device())
    assert gen.device == acc.device()


@pytest.mark.cuda_only
def test_graph_capture_and_replay_through_the_accelerator(accelerator) -> None:
    acc = accelerator
    w = torch.randn(64, 64, device=acc.device())
    static_x = torch.randn(8, 64, device=acc.device())
    side = acc.Stream()
    side.wait_stream(acc.current_stream())
    with acc.stream(side):  # warm up outside the graph (cuBLAS handles, allocator)
        torch.tanh(static_x @ w)
    acc.current_stream().wait_stream(side)
    graph = acc.create_graph()
    with acc.capture_to_graph(graph):
        static_y = torch.tanh(static_x @ w)
    new_x = torch.randn(8, 64, device=acc.device())
    static_x.copy_(new_x)
    acc.replay_graph(graph)
    acc.synchronize()
    torch.testing.assert_close(static_y, torch.tanh(new_x @ w))  # the replay computed on the new input


# -- nccl, one rank -------------------------------------------------------------------------------------------------
def _one_rank_init() -> dict:
    acc = get_accelerator()
    dev = acc.device()
    out = {"backend": str(dist.get_backend()), "accelerator": acc.device_name(), "device": str(dev),
           "world": comm.get_world_size(), "rank": comm.get_rank()}
    # the backend's own kernels (shardwise's wrappers return at once for a group of one)
    t = torch.arange(4, dtype=torch.float32, device=dev)
    dist.all_reduce(t)
    gathered = torch.empty(4, device=dev)
    dist.all_gather_into_tensor(gathered, t)
    scattered = torch.empty(4, device=dev)
    dist.reduce_scatter_tensor(scattered, gathered)
    dist.broadcast(t, src=0)
    dist.barrier()
    host = torch.ones(3)  # a CPU tensor on the default group: the gloo side of cpu:gloo,cuda:nccl takes it
    dist.all_reduce(host)
    out["host"] = host
    # shardwise's wrappers, single-rank fast path included
    w = torch.arange(4, dtype=torch.bfloat16, device=dev)
    comm.all_reduce(w)
    g2 = torch.empty(4, dtype=torch.bfloat16, device=dev)
    comm.all_gather_into_tensor(g2, w)
    comm.broadcast(w, src=0)
    acc.synchronize()
    out.update(t=t.cpu(), gathered=gathered.cpu(), scattered=scattered.cpu(), w=w.float().cpu(), g2=g2.float().cpu(),
               accelerator_backend=acc.communication_backend_name())
    return out


def test_init_distributed_on_one_rank_uses_the_accelerators_backend() -> None:
    (r,) = run_gpu(_one_rank_init, world_size=1)
    expected = "gloo" if REHEARSAL else "cpu:gloo,cuda:nccl"
    assert r["backend"] == expected and r["accelerator_backend"] == ("gloo" if REHEARSAL else "nccl")
    assert r["accelerator"] == ACCELERATOR and r["world"] == 1 and r["rank"] == 0
    assert r["device"] == ("cpu" if REHEARSAL else "cuda:0")
    ref = torch.arange(4, dtype=torch.float32)
    assert torch.equal(r["host"], torch.ones(3))
    for key in ("t", "gathered", "scattered", "w", "g2"):
        assert torch.equal(r[key], ref), key
