"""AutoTP training of unmodified Hugging Face models (``tensor_parallel.autotp_size`` / ``tp_model_init``) against
single-process training of the same model on the global batch: losses every step and the gathered weights within
1e-5 relative (fp32 ranks vs a float64 reference), with ZeRO 0-2 over the data-parallel ranks and clipping active
on every step (the global norm counts split weights once per slice and replicated weights once)."""

from __future__ import annotations

import copy

import pytest
import torch

import shardwise
from shardwise import comm
from shardwise.tp import full_state_dict
from shardwise.tp.autotp import applied_topology
from tests.dist import run_ranks
from tests.models import assert_close_rel

transformers = pytest.importorskip("transformers")

SEQ, BATCH, STEPS, CLIP = 12, 2, 3, 0.5
VOCAB = 96


def tiny_hf(arch: str, *, heads: int = 4, kv_heads: int = 2) -> torch.nn.Module:
    """A tiny HF causal LM built from a config (same weights on every rank: seeded)."""
    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                  tie_word_embeddings=False)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.MistralConfig(**common, sliding_window=None)
        cls = transformers.MistralForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(config)


def batch(step: int, dp_rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000 * step + dp_rank)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def ds_config(stage: int, dp: int, tp: int | None, **extra) -> dict:
    cfg = {"train_batch_size": BATCH * dp, "train_micro_batch_size_per_gpu": BATCH, "gradient_clipping": CLIP,
           "optimizer": {"type": "SGD", "params": {"lr": 0.5, "momentum": 0.9}},
           "zero_optimization": {"stage": stage}, **extra}
    if tp is not None:
        cfg["tensor_parallel"] = {"autotp_size": tp}
    return cfg


def reference(arch: str, dp: int, **kw) -> tuple[list[float], dict[str, torch.Tensor]]:
    """float64 single-process training on the global batch (SGD: a wrong gradient scale or norm shows)."""
    model = copy.deepcopy(tiny_hf(arch, **kw)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for step in range(STEPS):
        ids = torch.cat([batch(step, r) for r in range(dp)])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_autotp(arch: str, stage: int, tp: int, use_init: bool = False, checkpointing: bool = False,
                 heads: tuple[int, int] = (4, 2)) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train with AutoTP on this rank; returns the global losses and the gathered full HF state dict."""
    model = tiny_hf(arch, heads=heads[0], kv_heads=heads[1])
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    world = torch.distributed.get_world_size()
    if use_init:
        model = shardwise.tp_model_init(model, tp_size=tp, dtype=torch.float32)
    cfg = ds_config(stage, world // tp, None if use_init else tp)
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
    topo = engine.topology
    assert topo.size("tp") == tp and applied_topology(model) is topo
    head = engine.module.get_output_embeddings()  # untied: split by vocabulary, logits gathered
    assert head.weight.shape[0] == VOCAB // tp and (tp == 1 or head.gather_output)
    losses = []
    for step in range(STEPS):
        ids = batch(step, topo.coord("dp"))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        comm.all_reduce(total, group=topo.dp_group)
        losses.append(total.item() / topo.size("dp"))
    return losses, full_state_dict(engine.module)


def _check(results: list, arch: str, dp: int, **kw) -> None:
    ref_losses, ref_params = reference(arch, dp, **kw)
    for rank, (losses, params) in enumerate(results):
        assert_close_rel(losses, ref_losses, what=f"rank {rank} losses")
        assert params.keys() == ref_params.keys()
        for name, value in params.items():
            assert_close_rel(value, ref_params[name], what=f"rank {rank} {name}")


@pytest.mark.parametrize("arch,stage,world,init", [
    pytest.param("llama", 0, 2, False, id="llama-tp2"),
    pytest.param("qwen2", 2, 2, True, id="qwen2-tp2-zero2-tp_model_init"),
    pytest.param("llama", 1, 4, False, id="llama-tp2xdp2-zero1", marks=pytest.mark.world4),
    pytest.param("mistral", 2, 4, False, id="mistral-tp2xdp2-zero2", marks=pytest.mark.world4),
])
def test_autotp_training_matches_single_process(arch, stage, world, init):
    results = run_ranks(train_autotp, arch, stage, 2, init, world_size=world)
    _check(results, arch, world // 2)


def test_autotp_uneven_heads_and_activation_checkpointing():
    # 6 query heads over 3 key/value heads on 2 ranks: 4 + 2 query heads (whole key/value groups per rank)
    results = run_ranks(train_autotp, "llama", 1, 2, False, True, (6, 3))
    _check(results, "llama", 1, heads=6, kv_heads=3)


def _bf16_losses() -> list[float]:
    model = tiny_hf("llama")
    cfg = ds_config(1, 1, 2, bf16={"enabled": True})
    engine, _, _, _ = shardwise.initialize(model=model, config=cfg)
    assert engine.module.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    out = []
    for step in range(STEPS):
        ids = batch(step, 0)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        out.append(loss.float().item())
    return out


def test_autotp_bf16_trains_close_to_fp32():
    ref_losses, _ = reference("llama", 1)
    losses = run_ranks(_bf16_losses)[0]
    assert_close_rel(losses, ref_losses, rtol=3e-2, atol=3e-2, what="bf16 losses")


def _zero3_refused() -> str:
    try:
        shardwise.initialize(model=tiny_hf("llama"), config=ds_config(3, 1, 2))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_autotp_with_zero3_is_refused():
    message = run_ranks(_zero3_refused)[0]
    assert "autotp_size = 2" in message and "stage 3" in message and "Fix" in message


# -- checkpoints: tp=2 -> tp=1 through the ordinary (universal) load, and full HF weights for from_pretrained -----
def _train_steps(engine, steps: range) -> list[float]:
    topo, losses = engine.topology, []
    for step in steps:
        ids = batch(step, topo.coord("dp"))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        comm.all_reduce(total, group=topo.dp_group)
        losses.append(total.item() / topo.size("dp"))
    return losses


def _save_at_tp2(ckpt: str, hf_dir: str) -> dict[str, torch.Tensor]:
    model = tiny_hf("llama")
    engine, _, _, _ = shardwise.initialize(model=model, config=ds_config(1, 1, 2))
    _train_steps(engine, range(STEPS - 1))
    engine.save_checkpoint(ckpt, tag="tp2")
    engine.save_16bit_model(hf_dir, "model.safetensors")
    if comm.get_rank() == 0:
        model.config.save_pretrained(hf_dir)
    return full_state_dict(engine.module)


def _resume(ckpt: str, tag: str, tp: int | None) -> tuple[list[float], dict[str, torch.Tensor]]:
    engine, _, _, _ = shardwise.initialize(model=tiny_hf("llama"), config=ds_config(1, 1, tp))
    engine.load_checkpoint(ckpt, tag=tag)
    assert engine.global_steps == STEPS - 1
    losses = _train_steps(engine, range(STEPS - 1, STEPS))
    return losses, full_state_dict(engine.module)


def _save_at_tp1(ckpt: str) -> None:
    engine, _, _, _ = shardwise.initialize(model=tiny_hf("llama"), config=ds_config(1, 1, None))
    _train_steps(engine, range(STEPS - 1))
    engine.save_checkpoint(ckpt, tag="tp1")


def test_autotp_checkpoint_reloads_at_tp1_and_saves_full_hf_weights(tmp_path):
    ckpt, hf_dir = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    saved = run_ranks(_save_at_tp2, ckpt, hf_dir)[0]
    ref_losses, ref_params = reference("llama", 1)
    losses, params = run_ranks(_resume, ckpt, "tp2", None, world_size=1)[0]
    # the optimizer state (momentum) moved with the weights: the tp=1 step continues the tp=2 run exactly
    assert_close_rel(losses, ref_losses[-1:], what="tp=1 loss after loading a tp=2 checkpoint")
    for name, value in params.items():
        assert_close_rel(value, ref_params[name], what=f"resumed {name}")
    # save_16bit_model wrote ordinary HF weights: from_pretrained loads them into the unsplit model
    loaded = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    state = loaded.state_dict()
    assert state.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(state[name], value), name


# -- one plan system: declarative plans (plan_for) and AutoTP's plan come from the same resolver ------------------
def _plans_keep_logits(names: list[str]) -> dict[str, float]:
    from shardwise.comm.topology import Topology
    from shardwise.tp import apply_plan, plan_for
    from shardwise.tp.autotp import apply_training_plan, plan_training
    from shardwise.tp.plans import BUILTIN_PLANS
    from tests.inference_models import tiny_config

    topo, worst = Topology(tp=2), {}
    x = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    for name in names:
        config = tiny_config(name)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        full = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            before = full(x).logits
        trained = copy.deepcopy(full)
        apply_training_plan(trained, plan_training(trained, 2), topo.tp_group)
        split = [trained]
        if config.model_type in BUILTIN_PLANS:
            split.append(apply_plan(copy.deepcopy(full), plan_for(full), topo))
        with torch.no_grad():
            worst[name] = max((m(x).logits - before).abs().max().item() for m in split)
    return worst


def test_declarative_and_autotp_plans_keep_logits_for_table_architectures():
    names = ["llama", "qwen2", "opt", "gpt_neox", "gptj", "falcon_grouped"]  # Falcon: AutoTP's plan only
    for rank_result in run_ranks(_plans_keep_logits, names):
        assert all(err < 1e-4 for err in rank_result.values()), rank_result


def _refusals() -> dict[str, str]:
    from shardwise.comm.topology import Topology
    from shardwise.tp import ModelParallelUnit

    out = {}
    cases = {
        "size mismatch": lambda: shardwise.initialize(
            model=shardwise.tp_model_init(tiny_hf("llama"), 2), config=ds_config(1, 1, 4)),
        "zero3 after tp_model_init": lambda: shardwise.initialize(
            model=shardwise.tp_model_init(tiny_hf("llama"), 2), config=ds_config(3, 1, None)),
        "mpu": lambda: shardwise.initialize(model=tiny_hf("llama"), config=ds_config(1, 1, 2),
                                            mpu=ModelParallelUnit(Topology(tp=2))),
        "twice": lambda: shardwise.tp_model_init(shardwise.tp_model_init(tiny_hf("llama"), 2), 2),
    }
    for name, call in cases.items():
        try:
            call()
            out[name] = "no error"
        except ValueError as exc:
            out[name] = str(exc)
    return out


def test_autotp_misuse_is_refused_with_the_fix():
    out = run_ranks(_refusals)[0]
    assert "autotp_size = 4" in out["size mismatch"] and "over 2 ranks" in out["size mismatch"]
    assert "stage 3" in out["zero3 after tp_model_init"] and "Fix" in out["zero3 after tp_model_init"]
    assert "mpu" in out["mpu"] and "Fix" in out["mpu"]
    assert "already split" in out["twice"]


def test_autotp_loads_a_tp1_checkpoint_at_tp2(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run_ranks(_save_at_tp1, ckpt, world_size=1)
    ref_losses, ref_params = reference("llama", 1)
    for losses, params in run_ranks(_resume, ckpt, "tp1", 2):
        assert_close_rel(losses, ref_losses[-1:], what="tp=2 loss after loading a tp=1 checkpoint")
        for name, value in params.items():
            assert_close_rel(value, ref_params[name], what=f"resumed {name}")
