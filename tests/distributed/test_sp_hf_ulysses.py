"""Ulysses sequence parallelism for unmodified Hugging Face models on 2 CPU ranks (sp=2) against single-process
training of the same model on the full sequences: forward loss and gradients (sdpa and eager; Llama, Qwen2,
Mistral with a sliding window; grouped-query heads split or replicated; uneven heads; padding and packed
documents), the tiled loss, engine training through the mpu that ``register_with_transformers`` returns (ZeRO 0-3,
SGD with clipping), the data adapter's shards, and the errors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import shardwise
from shardwise.comm import COMMS_LOG
from shardwise.comm.topology import Topology
from shardwise.sp import (
    UlyssesSPAttentionHF,
    UlyssesSPDataLoaderAdapter,
    sequence_parallel_mean,
    tiled_cross_entropy_sum,
)
from tests.dist import run_ranks

TOL = dict(rtol=1e-5, atol=1e-6)  # fp32
SEQ, BATCH, VOCAB = 16, 2, 64


def _model(arch: str, impl: str, heads: int = 4, kv: int = 2, window: int | None = None):
    """A tiny HF causal LM built from a config (same weights on every rank: same seed)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                  attn_implementation=impl, use_cache=False)
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    else:
        cfg, cls = tf.MistralConfig(sliding_window=window, **common), tf.MistralForCausalLM
    torch.manual_seed(0)
    return cls(cfg)


def _batch(seed: int, pad: str | None = None, packed: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if pad is not None:
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        if pad == "left":
            mask[0, :5] = 0
        else:
            mask[1, -6:] = 0
        batch["attention_mask"] = mask
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    if packed:  # three documents in row 0, two in row 1
        batch["position_ids"] = torch.tensor([list(range(5)) + list(range(7)) + list(range(4)),
                                              list(range(9)) + list(range(7))])
    return batch


def _reference(model, batch) -> tuple[float, list[torch.Tensor]]:
    """Single process, full sequence, the model's own loss (mean over valid next-token targets)."""
    keys = ("input_ids", "attention_mask", "position_ids", "labels")
    loss = model(**{k: batch[k] for k in keys if k in batch}).loss
    return loss.item(), [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def _forward_shard(model, shard, tiled: bool) -> torch.Tensor:
    inputs = {k: shard[k] for k in ("input_ids", "attention_mask", "position_ids") if k in shard}
    labels = shard["shift_labels"]
    if tiled:  # base model + lm_head in chunks: the logits are never materialised at once
        hidden = model.model(**inputs).last_hidden_state
        return tiled_cross_entropy_sum(hidden, model.lm_head, labels, shards=3)[0]
    # the model's own loss, as a sum (num_items_in_batch=1) over this shard's already shifted labels
    return model(**inputs, labels=labels, shift_labels=labels, num_items_in_batch=1).loss


def _parity(arch: str, impl: str, heads: int, kv: int, window, pad, packed: bool, tiled: bool,
            checkpointing: bool = False) -> None:
    model = _model(arch, impl, heads, kv, window)
    if checkpointing:  # HF's own activation checkpointing: attention (and its all-to-alls) recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rank = dist.get_rank()
    mine_batch, peer_batch = _batch(rank, pad, packed), _batch(1 - rank, pad, packed)
    refs = {r: _reference(model, b) for r, b in ((rank, mine_batch), (1 - rank, peer_batch))}
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=impl, sequence_parallel_size=2, micro_batch_size=BATCH,
        seq_length=SEQ, seq_length_is_variable=False)
    try:
        adapter = UlyssesSPDataLoaderAdapter([mine_batch], sp_rank=mpu.get_sequence_parallel_rank(),
                                             sp_group=mpu.get_sequence_parallel_group(),
                                             sp_world_size=mpu.get_sequence_parallel_world_size(), device="cpu")
        for source in (0, 1):  # shard of rank 0's batch, then of rank 1's
            shard = next(adapter)
            loss_sum = _forward_shard(model, shard, tiled)
            count = (shard["shift_labels"] != -100).sum()
            loss = sequence_parallel_mean(loss_sum, count, mpu.get_sequence_parallel_group())
            COMMS_LOG.reset()
            grads = torch.autograd.grad(loss, list(model.parameters()))
            # per layer: 4 all-to-alls backward, and with checkpointing the 4 of the recomputed forward
            assert COMMS_LOG.totals(op="all_to_all", group="sp").count == (8 if checkpointing else 4) * 2
            ref_loss, ref_grads = refs[source]
            torch.testing.assert_close(loss.item(), ref_loss, **TOL)
            for p_name, g, ref in zip([n for n, _ in model.named_parameters()], grads, ref_grads):
                total = g.clone()
                dist.all_reduce(total)  # gradients are summed over the sequence ranks
                torch.testing.assert_close(total, ref, **TOL, msg=lambda m, n=p_name: f"{n}: {m}")
    finally:
        UlyssesSPAttentionHF.unregister_from_transformers()


@pytest.mark.parametrize("arch,impl,heads,kv,window,pad,packed,tiled", [
    pytest.param("llama", "sdpa", 4, 2, None, None, False, False, id="llama-sdpa-gqa"),
    pytest.param("llama", "eager", 4, 2, None, None, False, False, id="llama-eager-gqa"),
    pytest.param("llama", "sdpa", 4, 1, None, None, False, True, id="llama-sdpa-mqa-replicated-tiled"),
    pytest.param("llama", "eager", 4, 1, None, "left", False, False, id="llama-eager-mqa-left-padding"),
    pytest.param("llama", "sdpa", 4, 2, None, "right", False, True, id="llama-sdpa-right-padding-tiled"),
    pytest.param("llama", "sdpa", 4, 2, None, None, True, False, id="llama-sdpa-packed"),
    pytest.param("llama", "eager", 3, 3, None, None, False, False, id="llama-eager-uneven-heads"),
    pytest.param("qwen2", "sdpa", 4, 2, None, "left", False, False, id="qwen2-sdpa-left-padding"),
    pytest.param("qwen2", "eager", 4, 4, None, None, False, True, id="qwen2-eager-mha-tiled"),
    pytest.param("mistral", "sdpa", 4, 2, 5, None, False, False, id="mistral-sdpa-sliding-window"),
    pytest.param("mistral", "eager", 4, 2, 5, "left", False, False, id="mistral-eager-window-padding"),
])
def test_hf_model_loss_and_gradients_match_single_process(arch, impl, heads, kv, window, pad, packed, tiled):
    run_ranks(_parity, arch, impl, heads, kv, window, pad, packed, tiled)


def test_hf_gradient_checkpointing_recomputes_the_all_to_alls():
    run_ranks(_parity, "llama", "sdpa", 4, 2, None, "left", False, False, kwargs={"checkpointing": True})


# -- training through the engine -------------------------------------------------------------------------------------
# Gradient norms here are ~1.7: clipping at 2.5 is inactive, so a wrong gradient scale changes the SGD update (a clip
# active on every step would hide it: clipped gradients do not depend on their scale); 1.0 checks the global norm.
STEPS, LR = 3, 0.5


def _reference_training(arch: str, impl: str, clip: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain PyTorch: the batches in the order the adapter serves them (rank 0's, rank 1's, rank 0's next...)."""
    model = _model(arch, impl)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for step in range(STEPS):
        batch = _batch(100 * (step // 2) + step % 2, pad="left")
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _engine_training(arch: str, impl: str, stage: int, tiled: bool, clip: float,
                     via_config: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The calls accelerate makes for sp_backend="deepspeed": register -> adapter -> initialize(mpu=...)."""
    model = _model(arch, impl)
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, sequence_parallel_size=2, seq_length=None, seq_length_is_variable=True,
        core_attn_implementation=impl, micro_batch_size=BATCH, disable_in_eval=False)
    rank = dist.get_rank()
    loader = [_batch(100 * i + rank, pad="left") for i in range(2)]
    adapter = UlyssesSPDataLoaderAdapter(loader, sp_rank=mpu.get_sequence_parallel_rank(),
                                         sp_group=mpu.get_sequence_parallel_group(),
                                         sp_world_size=mpu.get_sequence_parallel_world_size(), device="cpu")
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": clip,
              "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": 0.9}},
              "zero_optimization": {"stage": stage}}
    if via_config:  # DeepSpeed's top-level key builds the same sp axis without the mpu
        config["sequence_parallel_size"] = 2
    engine, _, _, _ = shardwise.initialize(model=model, model_parameters=model.parameters(), config_params=config,
                                           mpu=None if via_config else mpu)
    assert engine.topology.size("sp") == 2 and engine.topology.size("dp") == 1
    losses = []
    for _ in range(STEPS):
        shard = next(adapter)
        count = (shard["shift_labels"] != -100).sum()
        loss_sum = _forward_shard(engine.module, shard, tiled) if tiled else engine(
            input_ids=shard["input_ids"], attention_mask=shard["attention_mask"],
            position_ids=shard["position_ids"], labels=shard["shift_labels"], shift_labels=shard["shift_labels"],
            num_items_in_batch=1).loss
        loss = sequence_parallel_mean(loss_sum, count, engine)  # the engine: knows how it reduces sp gradients
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with shardwise.zero.GatheredParameters(list(engine.module.parameters())):
        state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    UlyssesSPAttentionHF.unregister_from_transformers()
    return losses, state


@pytest.mark.parametrize("arch,impl,stage,tiled,clip", [
    pytest.param("llama", "sdpa", 0, False, 2.5, id="llama-sdpa-zero0"),
    pytest.param("llama", "sdpa", 1, True, 2.5, id="llama-sdpa-zero1-tiled"),
    pytest.param("qwen2", "eager", 2, False, 1.0, id="qwen2-eager-zero2-clipped"),
    pytest.param("llama", "sdpa", 3, False, 2.5, id="llama-sdpa-zero3"),
])
def test_engine_training_matches_single_process(arch, impl, stage, tiled, clip):
    _check_training(arch, impl, clip, run_ranks(_engine_training, arch, impl, stage, tiled, clip))


def test_engine_training_with_sequence_parallel_size_in_the_config():
    _check_training("llama", "sdpa", 2.5, run_ranks(_engine_training, "llama", "sdpa", 2, False, 2.5, True))


def _check_training(arch: str, impl: str, clip: float, results: list) -> None:
    ref_losses, ref_state = _reference_training(arch, impl, clip)
    for losses, state in results:
        torch.testing.assert_close(losses, ref_losses, **TOL)
        assert state.keys() == ref_state.keys()
        for name, value in state.items():
            torch.testing.assert_close(value, ref_state[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


# -- the data adapter ----------------------------------------------------------------------------------------------
def _adapter_shards(length: int) -> tuple[list[dict], list[dict]]:
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    batches = []
    for i in range(2):
        ids = torch.randint(1, VOCAB, (2, length), generator=g)
        batches.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids),
                        "tag": f"rank{rank}-batch{i}", "weights": torch.tensor([rank, i])})
    adapter = UlyssesSPDataLoaderAdapter(batches, sp_rank=rank, sp_group=Topology(sp=2), sp_world_size=2,
                                         device="cpu")
    assert len(adapter) == 4
    shards = [next(adapter) for _ in range(4)]
    with pytest.raises(StopIteration):
        next(adapter)
    return batches, shards


@pytest.mark.parametrize("length", [16, 13])
def test_adapter_shards_reassemble_to_the_batch_with_labels_shifted_before_sharding(length):
    results = run_ranks(_adapter_shards, length)
    padded = -(-length // 2) * 2
    for i in range(4):  # the i-th micro-batch: batch i // 2 of rank i % 2, sharded over both ranks
        src_rank, src_batch = i % 2, i // 2
        original = results[src_rank][0][src_batch]
        parts = [results[r][1][i] for r in range(2)]
        ids = torch.cat([p["input_ids"] for p in parts], dim=1)
        shift = torch.cat([p["shift_labels"] for p in parts], dim=1)
        pos = torch.cat([p["position_ids"] for p in parts], dim=1)
        mask = torch.cat([p["attention_mask"] for p in parts], dim=1)
        assert ids.shape == (2, padded) and all(p["input_ids"].shape[1] == padded // 2 for p in parts)
        assert torch.equal(ids[:, :length], original["input_ids"]) and bool((ids[:, length:] == 0).all())
        assert torch.equal(shift[:, :length - 1], original["labels"][:, 1:])  # the border target is kept
        assert bool((shift[:, length - 1:] == -100).all())
        assert torch.equal(pos, torch.arange(padded).expand(2, -1))
        assert torch.equal(mask[:, :length], original["attention_mask"]) and bool((mask[:, length:] == 0).all())
        assert all("labels" not in p for p in parts)
        assert all(p["tag"] == original["tag"] and torch.equal(p["weights"], original["weights"]) for p in parts)


# -- the mpu, the config, errors --------------------------------------------------------------------------------------
def _deepspeed_ulysses_mpu() -> tuple[int, int]:
    """DeepSpeed's parallel_state_sp module has only sequence getters: initialize(mpu=...) derives the rest."""
    topo = Topology(sp=2)
    mpu = SimpleNamespace(get_sequence_parallel_group=lambda: topo.sp_group.torch_group,
                          get_sequence_parallel_world_size=lambda: 2,
                          get_sequence_parallel_rank=lambda: topo.coord("sp"),
                          get_sequence_data_parallel_group=lambda: topo.zero_group.torch_group)
    model = torch.nn.Linear(4, 4)
    engine, _, _, _ = shardwise.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, mpu=mpu)
    with pytest.raises(ValueError, match="sequence_parallel_size = 4"):
        shardwise.initialize(model=copy.deepcopy(model), config={
            "train_micro_batch_size_per_gpu": 1, "sequence_parallel_size": 4}, mpu=mpu)
    return engine.topology.size("sp"), engine.topology.size("dp")


def test_initialize_accepts_deepspeeds_ulysses_mpu():
    assert run_ranks(_deepspeed_ulysses_mpu) == [(2, 1), (2, 1)]


def _errors() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    model = _model("llama", "sdpa")
    assert UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", 1, BATCH) is None  # sp 1: nothing
    with pytest.raises(ValueError, match="not supported by shardwise's Ulysses"):
        UlyssesSPAttentionHF.register_with_transformers(model, "flash_attention_2", 2, BATCH)
    with pytest.raises(ValueError, match="loaded with attn_implementation='sdpa'"):
        UlyssesSPAttentionHF.register_with_transformers(model, "eager", 2, BATCH)
    mpu = UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", 2, BATCH)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not original
    with pytest.raises(RuntimeError, match="already registered"):
        UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", 2, BATCH)
    ids = torch.randint(0, VOCAB, (1, 6 + 2 * mpu.get_sequence_parallel_rank()))  # unequal shards
    with pytest.raises(ValueError, match="different shards"):
        model(input_ids=ids)
    UlyssesSPAttentionHF.unregister_from_transformers()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
    other = _model("llama", "sdpa")  # after unregistering, the plain model is plain again
    ids = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(model(input_ids=ids).logits, other(input_ids=ids).logits)


def test_registration_errors_and_restore():
    run_ranks(_errors)


def _loss_reduction(counts: tuple[int, int]) -> tuple[float, float]:
    rank = dist.get_rank()
    value = torch.tensor(3.0 + rank, requires_grad=True)
    loss = sequence_parallel_mean(value * counts[rank], counts[rank], Topology(sp=2))
    loss.backward()
    return loss.item(), value.grad.item()


def test_loss_reduction_weights_ranks_by_valid_tokens():
    results = run_ranks(_loss_reduction, (3, 1))
    assert [r[0] for r in results] == [pytest.approx((3 * 3 + 4 * 1) / 4)] * 2
    assert [r[1] for r in results] == [pytest.approx(3 / 4), pytest.approx(1 / 4)]  # each rank: its share
    results = run_ranks(_loss_reduction, (0, 2))  # a shard with no valid token contributes nothing
    assert [r[0] for r in results] == [pytest.approx(4.0)] * 2
