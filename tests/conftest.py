"""Test-suite settings: one thread per process (ranks share 2 cores), the CPU accelerator, markers."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("SHARDWISE_ACCELERATOR", "cpu")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402

torch.set_num_threads(1)
