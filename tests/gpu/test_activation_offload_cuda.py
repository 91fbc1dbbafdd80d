"""``cpu_checkpointing`` on CUDA: the saved inputs of every checkpointed block go to host memory, the device holds
less after the forward, and gradients equal those of the model without checkpointing.

Measured: device bytes allocated after the forward (before backward), with and without ``cpu_checkpointing``, on a
LLaMA whose 4 blocks are checkpointed (each keeps its input, ``batch x seq x dim`` fp32 = 2 MiB). Stated: the stash
is entirely on the host (``checkpointing.memory_stats()``), and the device holds at least 90% of the stash's bytes
less. Gradients: within 1e-5 relative per tensor of the uncheckpointed model (the recomputation runs the same
kernels on the same inputs).
"""

from __future__ import annotations

import pytest
import torch

from shardwise import checkpointing
from shardwise.accelerator import get_accelerator
from shardwise.models import Llama, LlamaConfig
from tests.gpu.harness import run_gpu
from tests.models import assert_state_close

CFG = dict(vocab_size=512, dim=256, n_layers=4, n_heads=4, max_seq_len=256)
BATCH, SEQ = 8, 256


def _forward_backward(checkpoint: bool, cpu_checkpointing: bool) -> dict:
    acc = get_accelerator()
    dev = acc.device()
    checkpointing.configure(None, checkpoint_in_cpu=cpu_checkpointing)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CFG, checkpoint_activations=checkpoint)).to(dev)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ + 1), generator=g).to(dev)
    acc.synchronize()
    acc.empty_cache()
    start = acc.memory_allocated()
    loss = model(tokens[:, :-1], tokens[:, 1:])
    acc.synchronize()
    held = acc.memory_allocated() - start
    stash = checkpointing.memory_stats()
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
    return {"held": held, "stash": stash, "loss": loss.item(), "grads": grads}


@pytest.mark.cuda_only
def test_cpu_checkpointing_moves_saved_inputs_to_the_host() -> None:
    (plain,) = run_gpu(_forward_backward, False, False)
    (on_device,) = run_gpu(_forward_backward, True, False)
    (on_host,) = run_gpu(_forward_backward, True, True)
    per_block = BATCH * SEQ * CFG["dim"] * 4
    assert on_device["stash"] == {"cuda": CFG["n_layers"] * per_block}, on_device["stash"]
    assert on_host["stash"] == {"cpu": CFG["n_layers"] * per_block}, on_host["stash"]
    saved = on_device["held"] - on_host["held"]
    print(f"device bytes held after forward: no checkpointing {plain['held'] / 2**20:.1f} MiB, checkpointing "
          f"{on_device['held'] / 2**20:.1f} MiB, + cpu_checkpointing {on_host['held'] / 2**20:.1f} MiB "
          f"(stash {on_host['stash']['cpu'] / 2**20:.1f} MiB on the host)")
    assert saved >= 0.9 * on_host["stash"]["cpu"], f"device held only {saved} bytes less"
    assert on_device["held"] < plain["held"]  # checkpointing itself saves activations on the device
    for run in (on_device, on_host):
        assert run["loss"] == pytest.approx(plain["loss"], rel=1e-6)
        assert_state_close(run["grads"], plain["grads"], rtol=1e-5, what="gradients")
