"""Shared pieces of the tensor/sequence-parallel parity tests: a tiny LLaMA, its data, and both trainers.

The oracle is the repository's usual one: the plain (degree-1) model built from the same seed, trained on one
process in float64 on the global batch, with the same optimizer and clipping.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import shardwise
from shardwise import comm
from shardwise.comm.topology import Topology
from shardwise.models import Llama, LlamaConfig
from shardwise.tp import ModelParallelUnit

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
SEQ, BATCH, STEPS, CLIP = 16, 4, 3, 0.3
# SGD is the oracle optimizer: its update is proportional to the gradient, so a wrong gradient scale or a wrong
# global norm (clipping is active on every step) changes the weights. Adam would hide both (it is invariant to a
# uniform gradient scale) and, normalising every element, turns fp32 rounding of near-zero gradients into
# lr-sized differences from the float64 reference. ZeRO with Adam is covered by tests/distributed/test_zero_stages.py.
OPTIMIZERS = {
    "sgd": ({"type": "SGD", "params": {"lr": 1.0, "momentum": 0.9}},
            lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9)),
}


def llama_batch(step: int, dp_rank: int, cfg: LlamaConfig = TINY, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and next-token targets for (step, data-parallel rank)."""
    g = torch.Generator().manual_seed(9_000 + 1_000 * step + dp_rank)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def ds_config(stage: int, dp: int, optimizer: str = "sgd", **extra: Any) -> dict:
    """``optimizer`` (see OPTIMIZERS), clipping active on every step, ZeRO ``stage``."""
    return {"train_batch_size": BATCH * dp, "train_micro_batch_size_per_gpu": BATCH,
            "gradient_clipping": CLIP, "optimizer": OPTIMIZERS[optimizer][0],
            "zero_optimization": {"stage": stage}, **extra}


def reference(cfg: LlamaConfig, dp: int, steps: int = STEPS,
              optimizer: str = "sgd") -> tuple[list[float], dict[str, torch.Tensor]]:
    """float64 single-process training of the plain model on the global batches."""
    torch.manual_seed(0)
    model = copy.deepcopy(Llama(cfg)).double()
    opt = OPTIMIZERS[optimizer][1](model.parameters())
    losses = []
    for step in range(steps):
        batches = [llama_batch(step, r, cfg) for r in range(dp)]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_parallel(cfg: LlamaConfig, ds: dict, tp: int = 1, sp: int = 1,
                   steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train ``Llama(cfg, topology)`` with the engine on this rank; returns global losses and the full weights."""
    topo = Topology(tp=tp, sp=sp)
    torch.manual_seed(0)
    model = Llama(cfg, topo)
    engine, _, _, _ = shardwise.initialize(model=model, config=ds, mpu=ModelParallelUnit(topo))
    assert engine.topology is topo
    dp_rank, sp_rank, shard = topo.coord("dp"), topo.coord("sp"), SEQ // sp
    losses = []
    for step in range(steps):
        x, y = llama_batch(step, dp_rank, cfg)
        x, y = x[:, sp_rank * shard:(sp_rank + 1) * shard], y[:, sp_rank * shard:(sp_rank + 1) * shard]
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        comm.all_reduce(total, group=topo.zero_group)  # mean over data x sequence ranks = the global mean
        losses.append(total.item() / topo.zero_group.size)
    return losses, engine.module.full_state_dict()
