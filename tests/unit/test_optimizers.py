"""build_optimizer (DeepSpeed config semantics), Lamb, Lion, is_zero_supported_optimizer, describe_optimizer."""

from __future__ import annotations

import pytest
import torch

from shardwise.engine.optimizers import build_optimizer, describe_optimizer, is_zero_supported_optimizer
from shardwise.ops.adam import CPUAdam, FusedAdam
from shardwise.ops.lamb import FusedLamb, Lamb
from shardwise.ops.lion import DeepSpeedCPULion, FusedLion, Lion


def _params(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5 + i, 4, generator=g).requires_grad_() for i in range(n)]


def _train(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int = 5) -> list[torch.Tensor]:
    for s in range(steps):
        g = torch.Generator().manual_seed(100 + s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    ("opt_type", "extra", "cls", "adamw"),
    [
        ("Adam", {}, FusedAdam, True),  # DeepSpeed: adam_w_mode defaults to true
        ("adam", {"adam_w_mode": False}, FusedAdam, False),
        ("ADAMW", {"adam_w_mode": False}, FusedAdam, True),  # AdamW is always AdamW
        ("Adam", {"torch_adam": True}, torch.optim.AdamW, True),
        ("Adam", {"torch_adam": True, "adam_w_mode": False}, torch.optim.Adam, False),
        ("AdamW", {"torch_adam": True}, torch.optim.AdamW, True),
    ],
)
def test_adam_variants(opt_type, extra, cls, adamw):
    opt = build_optimizer(opt_type, {"lr": 0.01, "weight_decay": 0.1, **extra}, _params())
    assert type(opt) is cls
    if cls is FusedAdam:
        assert opt.adam_w_mode is adamw
    else:
        assert opt.defaults["fused"] is True  # torch's fastest implementation when the config is silent


@pytest.mark.parametrize(("adam_w_mode", "torch_cls"), [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
def test_adam_weight_decay_semantics_match_torch(adam_w_mode, torch_cls):
    ours = _train(build_optimizer("Adam", {"lr": 0.01, "weight_decay": 0.1, "adam_w_mode": adam_w_mode},
                                  p := _params()), p)
    ref = _train(torch_cls(q := _params(), lr=0.01, weight_decay=0.1), q)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("adam_w_mode", "expected"), [(None, True), (False, False)])
def test_offload_builds_cpu_adam(adam_w_mode, expected):
    cfg = {"lr": 1e-3} if adam_w_mode is None else {"lr": 1e-3, "adam_w_mode": adam_w_mode}
    opt = build_optimizer("Adam", cfg, _params(), offload=True)
    assert type(opt) is CPUAdam and opt.adam_w_mode is expected
    assert type(build_optimizer("AdamW", {}, _params(), offload=True)) is CPUAdam


def test_other_builtins_and_torch_lookup():
    assert type(build_optimizer("Lamb", {"lr": 1e-3}, _params())) is Lamb
    assert type(build_optimizer("lion", {"betas": [0.9, 0.99]}, _params())) is Lion
    sgd = build_optimizer("SGD", {"lr": 0.1, "momentum": 0.9}, _params())
    assert type(sgd) is torch.optim.SGD and (sgd.defaults.get("fused") or sgd.defaults.get("foreach"))
    assert type(build_optimizer("Adagrad", {"lr": 0.1}, _params())) is torch.optim.Adagrad
    rms = build_optimizer("rmsprop", {"lr": 0.01}, _params())  # torch.optim lookup, case-insensitive
    assert type(rms) is torch.optim.RMSprop
    gen = (p for p in _params())  # a generator of params works (it is consumed once)
    assert len(build_optimizer("SGD", {"lr": 0.1}, gen).param_groups[0]["params"]) == 3
    explicit = build_optimizer("SGD", {"lr": 0.1, "foreach": False}, _params())
    assert explicit.defaults["foreach"] is False and not explicit.defaults.get("fused")


def test_param_groups_pass_through():
    a, b = _params(2)
    opt = build_optimizer("AdamW", {"lr": 0.01}, [{"params": [a], "weight_decay": 0.0}, {"params": [b]}])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0] and opt.param_groups[1]["lr"] == 0.01


def test_max_grad_norm_is_rejected():
    with pytest.raises(ValueError, match="gradient_clipping"):
        build_optimizer("Adam", {"lr": 1e-3, "max_grad_norm": 1.0}, _params())


@pytest.mark.parametrize("name", ["OneBitAdam", "OnebitAdam", "ZeroOneAdam", "OneBitLamb"])
def test_removed_one_bit_optimizers(name):
    with pytest.raises(ValueError, match="removed in DeepSpeed 0.19.*Adam"):
        build_optimizer(name, {}, _params())


def test_unknown_names_and_keys_suggest_fixes():
    with pytest.raises(ValueError, match="unknown optimizer type 'Adamm'.*Did you mean 'Adam"):
        build_optimizer("Adamm", {}, _params())
    with pytest.raises(ValueError, match="Supported: Adam, AdamW, Lamb"):
        build_optimizer("Shampoo", {}, _params())
    with pytest.raises(ValueError, match="unknown parameter 'betaz'.*accepted parameters: lr.*Did you mean 'betas'"):
        build_optimizer("AdamW", {"betaz": [0.9, 0.99]}, _params())
    with pytest.raises(ValueError, match="'Lamb' got unknown parameter 'momentum'"):
        build_optimizer("Lamb", {"momentum": 0.9}, _params())
    with pytest.raises(ValueError, match="'SGD' got unknown parameter 'betas'"):
        build_optimizer("sgd", {"lr": 0.1, "betas": [0.9, 0.9]}, _params())
    with pytest.raises(ValueError, match="Muon"):
        build_optimizer("Muon", {}, _params())


def _lamb_reference(p, grads, *, lr, betas, eps, wd, max_coeff, min_coeff, eps_inside_sqrt=False):
    """float64 LAMB as DeepSpeed's kernel computes it, step by step."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    coeffs = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        denom = (v + eps).sqrt() if eps_inside_sqrt else v.sqrt() + eps
        u = m / denom + wd * p
        w_norm, u_norm = p.norm().item(), u.norm().item()
        coeff = min(max(w_norm / u_norm, min_coeff), max_coeff) if w_norm and u_norm else 1.0
        coeffs.append(coeff)
        p = p - lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t) * coeff * u
    return p, coeffs


@pytest.mark.parametrize("eps_inside_sqrt", [False, True])
@pytest.mark.parametrize(("scale", "max_coeff"), [(1.0, 10.0), (100.0, 10.0), (0.001, 10.0)])
def test_lamb_matches_deepspeed_formula(eps_inside_sqrt, scale, max_coeff):
    p0 = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * scale
    grads = [torch.randn(50, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(6)]
    p = p0.clone().requires_grad_()
    opt = FusedLamb([p], lr=0.01, weight_decay=0.01, eps_inside_sqrt=eps_inside_sqrt, max_coeff=max_coeff,
                    min_coeff=0.01)
    coeffs = []
    for g in grads:
        p.grad = g
        opt.step()
        coeffs += opt.get_lamb_coeffs()
    ref, ref_coeffs = _lamb_reference(p0, grads, lr=0.01, betas=(0.9, 0.999), eps=1e-8, wd=0.01, max_coeff=max_coeff,
                                      min_coeff=0.01, eps_inside_sqrt=eps_inside_sqrt)
    torch.testing.assert_close(p.detach(), ref, rtol=1e-10, atol=1e-12)
    assert coeffs == pytest.approx(ref_coeffs, rel=1e-10)


def test_lamb_zero_weights_use_coefficient_one_and_rejects_max_grad_norm():
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.ones(4)
    opt = Lamb([p], lr=0.1)
    opt.step()
    assert opt.get_lamb_coeffs() == [1.0] and torch.all(p < 0)
    with pytest.raises(ValueError, match="gradient_clipping"):
        Lamb(_params(), max_grad_norm=1.0)


def test_lion_matches_formula_and_aliases():
    assert FusedLion is Lion and DeepSpeedCPULion is Lion
    p0 = torch.randn(30, dtype=torch.float64)
    p = p0.clone().requires_grad_()
    opt = Lion([p], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    ref, m = p0.clone(), torch.zeros(30, dtype=torch.float64)
    for s in range(4):
        g = torch.randn(30, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        p.grad = g
        opt.step()
        c = 0.9 * m + 0.1 * g
        ref = ref * (1 - 0.01 * 0.1) - 0.01 * torch.sign(c)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(p.detach(), ref, rtol=1e-12, atol=1e-12)


def test_is_zero_supported_optimizer():
    ps = _params()
    for opt in (torch.optim.Adam(ps), torch.optim.AdamW(ps), torch.optim.SGD(ps, lr=0.1), CPUAdam(ps),
                FusedAdam(ps), Lion(ps), torch.optim.Adagrad(ps)):
        assert is_zero_supported_optimizer(opt), type(opt).__name__

    class MyAdam(torch.optim.Adam):
        pass

    for opt in (Lamb(ps), torch.optim.LBFGS(ps), MyAdam(ps)):
        assert not is_zero_supported_optimizer(opt), type(opt).__name__


def test_describe_optimizer():
    line = describe_optimizer(build_optimizer("Adam", {"lr": 3e-4, "weight_decay": 0.1}, _params(), offload=True))
    assert line.startswith("CPUAdam(") and "adamw_mode=True" in line and "lr=0.0003" in line
    assert "3 tensors" in line and "backend=" in line
    assert "fused=True" in describe_optimizer(build_optimizer("AdamW", {"torch_adam": True}, _params()))
