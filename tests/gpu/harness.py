"""Ranks on the CUDA accelerator for ``tests/gpu``: ``tests.dist``'s forkserver harness with another rank entry point.

``run_gpu(fn, *args, world_size=1, backend=None)`` runs the module-level ``fn`` in fresh processes (forked from the
same preloaded forkserver as every other distributed test) that choose the cuda accelerator and join a group through
``shardwise.comm.init_distributed``, so the CUDA code path of initialisation runs too (``set_device``, the backend
the accelerator names: nccl). Every rank uses device 0 (``LOCAL_RANK=0``): with ``backend="gloo"`` two ranks share
the one GPU of a single-GPU machine, which is how the collectives' CUDA-tensor paths are tested without a second
device. The store is a file (``file://``), so no TCP port can collide.

Rehearsal on a CPU machine: ``SHARDWISE_GPU_TESTS_ON_CPU=1`` runs the same bodies on the cpu accelerator over gloo
(tests that measure something only CUDA has are skipped then). It checks the tests' own logic here; it proves
nothing about CUDA.
"""

from __future__ import annotations

import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

from tests.dist import _resolve, run_ranks

REHEARSAL = os.environ.get("SHARDWISE_GPU_TESTS_ON_CPU", "") == "1"
ACCELERATOR = "cpu" if REHEARSAL else "cuda"
_BACKEND_VAR = "SHARDWISE_TEST_BACKEND"


def _gpu_rank_main(module: str, qualname: str, args: tuple, kwargs: dict, rank: int, world_size: int, store: str,
                   timeout: float, seed: int, env: dict[str, str], results: Any) -> None:
    payload: tuple
    try:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size),
                           "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "SHARDWISE_ACCELERATOR": ACCELERATOR})
        os.environ.update(env)
        import torch

        from shardwise import comm

        torch.set_num_threads(1)
        torch.manual_seed(seed)
        backend = os.environ.pop(_BACKEND_VAR, "") or None
        comm.init_distributed(dist_backend=backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                              timeout=timeout, verbose=False)
        value = _resolve(module, qualname)(*args, **kwargs)
        comm.barrier()
        comm.destroy_process_group()
        payload = (rank, "ok", pickle.dumps(value))
    except BaseException:  # report everything, as tests.dist does
        payload = (rank, "err", traceback.format_exc())
    try:
        results.put(payload)
        results.close()
        results.join_thread()
    finally:
        os._exit(0)


def run_gpu(fn: Callable, *args: Any, world_size: int = 1, backend: str | None = None, timeout: float = 120.0,
            seed: int = 0, env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh ranks on GPU 0; ``backend`` None means the accelerator's own
    (nccl on cuda). Results must be picklable without CUDA (return ``.cpu()`` tensors)."""
    if REHEARSAL and backend == "nccl":
        backend = "gloo"
    merged = {**(env or {}), _BACKEND_VAR: backend or ""}
    return run_ranks(fn, *args, world_size=world_size, timeout=timeout, seed=seed, env=merged,
                     rank_main=_gpu_rank_main)
