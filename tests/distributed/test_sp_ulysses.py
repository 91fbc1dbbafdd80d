"""All-to-all (Ulysses) sequence parallelism: ``DistributedAttention`` against full attention, and the LLaMA
reference model trained by the engine with SP=2 / SP=4 (x DP) against the float64 single-process reference."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardwise.comm import COMMS_LOG
from shardwise.comm.topology import Topology
from shardwise.sequence.layer import DistributedAttention as DeepSpeedName
from shardwise.sp import DistributedAttention
from tests.dist import run_ranks
from tests.distributed.llama_helpers import TINY, ds_config, train_parallel
from tests.distributed.test_tp_training import _check

TOL = dict(rtol=1e-5, atol=1e-6)


def _attention(q, k, v, merge_heads: bool, seq_first: bool):
    if seq_first:  # [s, b, h, d] -> [b, s, h, d]
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    if k.shape[2] != q.shape[2]:
        k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    out = out.transpose(1, 2)
    if seq_first:
        out = out.transpose(0, 1)
    return out.flatten(-2) if merge_heads else out


def _layer(heads: int, kv_heads: int, seq_first: bool, merge_heads: bool) -> None:
    topo = Topology(sp=dist.get_world_size())
    n, r = topo.size("sp"), topo.coord("sp")
    torch.manual_seed(11)
    b, s, d = 2, 4 * n, 8
    shape = (s, b) if seq_first else (b, s)
    q = torch.randn(*shape, heads, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(*shape, kv_heads, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    full = _attention(q, k, v, merge_heads, seq_first)
    grad_out = torch.randn_like(full)
    full.backward(grad_out)
    seq_dim, lo, hi = (0 if seq_first else 1), r * s // n, (r + 1) * s // n
    shards = [t.detach().narrow(seq_dim, lo, hi - lo).clone().requires_grad_() for t in (q, k, v)]
    layer = DistributedAttention(lambda a, bb, c: _attention(a, bb, c, merge_heads, seq_first), topo.sp_group,
                                 scatter_idx=2, gather_idx=seq_dim)
    out = layer(*shards, 1 if seq_first else 0)
    torch.testing.assert_close(out, full.narrow(seq_dim, lo, hi - lo), **TOL)
    out.backward(grad_out.narrow(seq_dim, lo, hi - lo))
    for mine, ref in zip(shards, (q, k, v)):
        torch.testing.assert_close(mine.grad, ref.grad.narrow(seq_dim, lo, hi - lo), **TOL)


@pytest.mark.parametrize("world,heads,kv,seq_first,merge", [
    pytest.param(2, 4, 4, False, False, id="sp2-even"),
    pytest.param(2, 3, 3, True, True, id="sp2-uneven-heads-seq-first-merged"),
    pytest.param(2, 4, 2, False, False, id="sp2-gqa"),
    pytest.param(4, 6, 6, False, True, id="sp4-uneven-heads", marks=pytest.mark.world4),
])
def test_distributed_attention_matches_full_attention(world, heads, kv, seq_first, merge):
    run_ranks(_layer, heads, kv, seq_first, merge, world_size=world)


def test_deepspeed_import_path_is_the_same_class():
    assert DeepSpeedName is DistributedAttention


def _bad_gqa() -> None:
    topo = Topology(sp=2)
    layer = DistributedAttention(lambda q, k, v: q, topo.sp_group)
    q, kv = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="key/value heads"):
        layer(q, kv, kv, 0)


def test_indivisible_kv_heads_are_refused_with_the_fix():
    run_ranks(_bad_gqa)


@pytest.mark.parametrize("sp,world", [
    pytest.param(2, 2, id="sp2"),
    pytest.param(4, 4, id="sp4-gqa-repeat", marks=pytest.mark.world4),
    pytest.param(2, 4, id="dp2xsp2-zero1", marks=pytest.mark.world4),
])
def test_ulysses_training_matches_reference(sp, world):
    dp = world // sp
    results = run_ranks(train_parallel, TINY, ds_config(1 if dp > 1 else 2, dp), 1, sp, world_size=world)
    _check(results, TINY, dp)


def _a2a_counts() -> tuple[int, int]:
    from dataclasses import replace

    from shardwise.models import Llama

    topo = Topology(sp=2)
    torch.manual_seed(0)
    model = Llama(replace(TINY, n_layers=3, n_kv_heads=4), topo)
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    COMMS_LOG.reset()
    loss = model(x, x)
    fwd = COMMS_LOG.totals(op="all_to_all", group="sp").count
    COMMS_LOG.reset()
    loss.backward()
    return fwd, COMMS_LOG.totals(op="all_to_all", group="sp").count


def test_ulysses_comms_four_all_to_alls_per_layer_each_way():
    assert run_ranks(_a2a_counts)[0] == (4 * 3, 4 * 3)


@pytest.mark.world4
def test_ulysses_inside_tensor_parallelism_matches_reference():
    from dataclasses import replace

    cfg = replace(TINY, n_kv_heads=4)  # 2 key/value heads per tensor rank, split again over 2 sequence ranks
    _check(run_ranks(train_parallel, cfg, ds_config(2, 1), 2, 2, world_size=4), cfg, 1)
