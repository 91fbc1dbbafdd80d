"""Tensor-parallel layers, mappings, cross-entropy, RNG tracker and mpu on real ranks, each against plain PyTorch.

Every layer is checked the same way: build the full ``nn.Linear``/``nn.Embedding`` with a seed on every rank, make
the parallel layer from it (``from_linear``/``from_embedding``), run the same input through both, and compare the
output and the gradients (input gradient, and the full weight gradient re-assembled from the shards).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardwise.comm.topology import Topology
from shardwise.tp import (
    ColumnParallelLinear,
    ModelParallelUnit,
    MpuLayoutError,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_state_dict,
    get_cuda_rng_tracker,
    model_parallel_cuda_manual_seed,
    topology_from_mpu,
    vocab_parallel_cross_entropy,
)
from shardwise.tp import mappings as M
from shardwise.tp.partition import DimSplit
from tests.dist import run_ranks

TOL = dict(rtol=1e-5, atol=1e-6)


def _grad_full(layer, name: str) -> torch.Tensor:
    return layer.gather_full(name, getattr(layer, name).grad)


def _column(bias: bool, gather: bool, parts, grain: int, out: int, dtype: torch.dtype) -> None:
    topo = Topology(tp=dist.get_world_size())
    torch.manual_seed(1)
    full = nn.Linear(12, out, bias=bias).to(dtype)
    layer = ColumnParallelLinear.from_linear(full, topo.tp_group, gather_output=gather, grain=grain, parts=parts)
    assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 0
    x = torch.randn(3, 5, 12, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = full(x_ref)
    y = layer(x)
    if not gather:  # each rank holds its ranges of the output features
        y_local_ref = torch.cat([y_ref[..., lo:hi] for lo, hi in layer.split.ranges(layer.tp_rank)], -1)
        torch.testing.assert_close(y, y_local_ref, **TOL)
        # a loss that depends on every rank's slice: sum over ranks of (local * weights) == full loss
        w = torch.linspace(-1, 1, out, dtype=dtype)
        w_local = torch.cat([w[lo:hi] for lo, hi in layer.split.ranges(layer.tp_rank)])
        (y * w_local).sum().backward()
        (y_ref * w).sum().backward()
    else:
        torch.testing.assert_close(y, y_ref, **TOL)
        y.pow(2).sum().backward()
        y_ref.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(_grad_full(layer, "weight"), full.weight.grad, **TOL)
    if bias:
        torch.testing.assert_close(_grad_full(layer, "bias"), full.bias.grad, **TOL)


@pytest.mark.parametrize("case", [
    dict(bias=True, gather=True, parts=None, grain=1, out=10, dtype=torch.float32),
    dict(bias=False, gather=False, parts=None, grain=1, out=9, dtype=torch.float32),  # uneven: 5 + 4
    dict(bias=True, gather=True, parts=(8, 4, 4), grain=2, out=16, dtype=torch.float32),  # fused q|k|v, gathered
    dict(bias=True, gather=False, parts=(6, 6), grain=1, out=12, dtype=torch.float64),  # fused gate|up
], ids=["gather", "uneven", "fused-gather", "fused-f64"])
def test_column_parallel_linear_matches_linear(case):
    run_ranks(_column, case["bias"], case["gather"], case["parts"], case["grain"], case["out"], case["dtype"])


def _row(bias: bool, input_is_parallel: bool, in_features: int, parts) -> None:
    topo = Topology(tp=dist.get_world_size())
    torch.manual_seed(2)
    full = nn.Linear(in_features, 7, bias=bias)
    layer = RowParallelLinear.from_linear(full, topo, input_is_parallel=input_is_parallel, parts=parts)
    assert layer.weight.partition_dim == 1 and not hasattr(layer.bias, "tensor_model_parallel")
    x_full = torch.randn(4, in_features)
    if input_is_parallel:
        x = torch.cat([x_full[:, lo:hi] for lo, hi in layer.split.ranges(layer.tp_rank)], -1).requires_grad_()
    else:
        x = x_full.clone().requires_grad_()
    x_ref = x_full.clone().requires_grad_()
    y, y_ref = layer(x), full(x_ref)
    torch.testing.assert_close(y, y_ref, **TOL)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(_grad_full(layer, "weight"), full.weight.grad, **TOL)
    if bias:
        torch.testing.assert_close(layer.bias.grad, full.bias.grad, **TOL)
    if not input_is_parallel:
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL)


@pytest.mark.parametrize("bias,input_is_parallel,in_features,parts", [
    (True, True, 10, None), (False, False, 9, None), (True, False, 12, (6, 6))], ids=["split-in", "full-in", "fused"])
def test_row_parallel_linear_matches_linear(bias, input_is_parallel, in_features, parts):
    run_ranks(_row, bias, input_is_parallel, in_features, parts)


def _embedding_and_loss(vocab: int) -> None:
    topo = Topology(tp=dist.get_world_size())
    torch.manual_seed(3)
    emb_full, head_full = nn.Embedding(vocab, 6, padding_idx=1), nn.Linear(6, vocab, bias=False)
    emb = VocabParallelEmbedding.from_embedding(emb_full, topo)
    head = ColumnParallelLinear.from_linear(head_full, topo)
    ids = torch.randint(0, vocab, (3, 5))
    ids[0, 0] = 1  # the padding row gets no gradient
    targets = torch.randint(0, vocab, (3, 5))
    targets[1, 2] = -100  # ignored
    loss = vocab_parallel_cross_entropy(head(emb(ids)), targets, topo, split=head.split)
    ref = F.cross_entropy(head_full(emb_full(ids)).view(-1, vocab), targets.view(-1), reduction="none").view(3, 5)
    torch.testing.assert_close(loss, ref, **TOL)
    assert loss[1, 2] == 0
    (loss.sum() / (targets != -100).sum()).backward()
    (ref.sum() / (targets != -100).sum()).backward()
    torch.testing.assert_close(_grad_full(emb, "weight"), emb_full.weight.grad, **TOL)
    torch.testing.assert_close(_grad_full(head, "weight"), head_full.weight.grad, **TOL)
    assert emb_full.weight.grad[1].abs().sum() == 0


@pytest.mark.parametrize("vocab", [32, 33], ids=["even", "uneven"])
def test_vocab_parallel_embedding_and_cross_entropy(vocab):
    run_ranks(_embedding_and_loss, vocab)


def _sequence_mappings() -> None:
    topo = Topology(tp=2)
    g, r = topo.tp_group, topo.coord("tp")
    torch.manual_seed(4)
    full = torch.randn(2, 6, 3)
    shard = full[:, 3 * r: 3 * r + 3].clone().requires_grad_()
    gathered = M.gather_from_sequence_parallel_region(shard, g, dim=1)
    torch.testing.assert_close(gathered, full)
    gathered.backward(torch.ones_like(gathered) * (r + 1))  # partial grads 1 and 2: reduce-scatter sums to 3
    torch.testing.assert_close(shard.grad, torch.full_like(shard, 3.0))
    y = full.clone().requires_grad_()
    rs = M.reduce_scatter_to_sequence_parallel_region(y * (r + 1), g, dim=1)
    torch.testing.assert_close(rs, 3 * full[:, 3 * r: 3 * r + 3])
    rs.sum().backward()
    torch.testing.assert_close(y.grad, torch.full_like(y, r + 1.0))
    s = M.scatter_to_sequence_parallel_region(full.clone().requires_grad_(), g, dim=1)
    torch.testing.assert_close(s, full[:, 3 * r: 3 * r + 3])
    with pytest.raises(ValueError, match="evenly"):
        M.scatter_to_sequence_parallel_region(torch.randn(2, 5, 3), g, dim=1)


def test_sequence_parallel_mappings():
    run_ranks(_sequence_mappings)


def _state_roundtrip() -> None:
    topo = Topology(tp=2)
    torch.manual_seed(5)
    full = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3))
    tp = nn.Sequential(ColumnParallelLinear.from_linear(full[0], topo, parts=(5, 4)), nn.Tanh(),
                       RowParallelLinear.from_linear(full[2], topo, parts=(5, 4)))
    for key, value in full_state_dict(tp).items():
        torch.testing.assert_close(value, full.state_dict()[key], rtol=0, atol=0)
    x = torch.randn(2, 4)
    torch.testing.assert_close(tp(x), full(x), **TOL)


def test_full_state_dict_roundtrip_with_fused_parts():
    run_ranks(_state_roundtrip)


def _rng_tracker() -> list:
    topo = Topology(tp=2)
    mpu = ModelParallelUnit(topo)
    mpu.model_parallel_cuda_manual_seed(123)
    shared = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        split = torch.rand(4)
    after = torch.rand(4)  # the default stream continues where it was: forking does not disturb it
    model_parallel_cuda_manual_seed(123, tp_rank=topo.coord("tp"))
    torch.rand(4)
    return [shared, split, after, torch.rand(4)]


def test_rng_tracker_same_where_replicated_different_where_split():
    (s0, p0, a0, b0), (s1, p1, a1, b1) = run_ranks(_rng_tracker)
    assert torch.equal(s0, s1) and torch.equal(a0, a1)  # replicated regions: identical masks
    assert not torch.equal(p0, p1)  # split regions: independent streams
    assert torch.equal(a0, b0)  # reseeding reproduces the default stream


class _MegatronMpu:
    """A user's own mpu, as Megatron builds it, over raw torch groups."""

    def __init__(self, tp: int, shuffled: bool = False) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp, self.dp = tp, world // tp
        tp_groups = [list(range(i * tp, (i + 1) * tp)) for i in range(self.dp)]
        dp_groups = [list(range(j, world, tp)) for j in range(tp)]
        if shuffled:  # tensor ranks strided instead of consecutive
            tp_groups, dp_groups = dp_groups, tp_groups
        for ranks in tp_groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                self.tp_group = g
        for ranks in dp_groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                self.dp_group = g

    def get_tensor_model_parallel_world_size(self):
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group


def _mpu_bridge(shuffled: bool) -> None:
    user = _MegatronMpu(tp=2, shuffled=shuffled)
    if shuffled:
        with pytest.raises(MpuLayoutError, match="rank layout"):
            topology_from_mpu(user)
        return
    topo = topology_from_mpu(user)
    assert (topo.size("tp"), topo.size("dp")) == (2, 2)
    mpu = ModelParallelUnit(topo)
    assert topology_from_mpu(mpu) is topo
    assert mpu.get_model_parallel_world_size() == mpu.get_tensor_model_parallel_world_size() == 2
    assert mpu.get_tensor_model_parallel_rank() == dist.get_rank() % 2
    assert mpu.get_data_parallel_rank() == dist.get_rank() // 2
    assert mpu.get_sequence_parallel_world_size() == 1 and mpu.get_slice_parallel_world_size() == 2
    t = torch.ones(1) * dist.get_rank()
    dist.all_reduce(t, group=mpu.get_data_parallel_group())  # real torch groups
    assert t.item() == (0 + 2) + 2 * (dist.get_rank() % 2)
    one = torch.ones(1)
    dist.all_reduce(one, group=mpu.get_sequence_parallel_group())  # one-rank group, not the world
    assert one.item() == 1


@pytest.mark.world4
@pytest.mark.parametrize("shuffled", [False, True], ids=["megatron-layout", "strided-tp"])
def test_topology_from_user_mpu(shuffled):
    run_ranks(_mpu_bridge, shuffled, world_size=4)


def test_split_rejects_mismatched_group():
    with pytest.raises(ValueError, match="DimSplit.of"):
        ColumnParallelLinear(4, 6, split=DimSplit.of(6, 2))  # no group: one rank, but the split is for two


def _hf_llama_tp2() -> None:
    import transformers

    from shardwise.tp import apply_plan, plan_for
    from shardwise.tp.plans import hf_llama_plan

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).logits
    plan = plan_for(model)
    assert plan == hf_llama_plan(config)
    apply_plan(model, plan, Topology(tp=2))  # strict: every pattern must match a module
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)  # one of two key/value heads
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, **TOL)


def test_hugging_face_llama_with_builtin_plan_at_tp2_keeps_logits():
    pytest.importorskip("transformers")
    run_ranks(_hf_llama_tp2)
