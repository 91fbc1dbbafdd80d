"""CPUAdam / adam_step_flat: numerics against torch's Adam/AdamW, dtypes, lowp copies, build robustness."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from shardwise.ops import build
from shardwise.ops.adam import CPUAdam, DeepSpeedCPUAdam, FusedAdam, adam_step_flat, adam_step_multi, backend_name
from shardwise.ops.adam import cpu_adam as cpu_adam_mod

SIZES = (1, 15, 16, 17, 1000, 40_000)  # vector tails, one block, several threads' worth
RTOL, ATOL = 1e-6, 1e-7


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _params(seed: int = 0, sizes=SIZES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for n in sizes]


def _grads(step: int, sizes=SIZES, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(n, generator=g).to(dtype) for n in sizes]


def _run(opt_factory, grad_dtype=torch.float32, steps: int = 20, sizes=SIZES) -> list[torch.Tensor]:
    params = [p.requires_grad_() for p in _params(sizes=sizes)]
    if grad_dtype != torch.float32 and hasattr(params[0], "grad_dtype"):
        for p in params:
            p.grad_dtype = None  # torch >= 2.10 checks grad dtypes; mixed-precision grads are the point here
    opt = opt_factory(params)
    for s in range(steps):
        for p, g in zip(params, _grads(s, sizes, grad_dtype)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


def test_kernel_is_built_here():
    assert backend_name() == "c", build.build_error(cpu_adam_mod.KERNEL_NAME)


@pytest.mark.parametrize("adamw_mode", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("fused", [True, False], ids=["torch-fused", "torch-default"])
def test_matches_torch_adam_20_steps(adamw_mode, weight_decay, fused):
    torch_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    ours = _run(lambda ps: CPUAdam(ps, lr=1e-2, weight_decay=weight_decay, adamw_mode=adamw_mode))
    ref = _run(lambda ps: torch_cls(ps, lr=1e-2, weight_decay=weight_decay, fused=fused or None))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_state_matches_torch_and_has_deepspeed_layout():
    params = [p.requires_grad_() for p in _params()]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ours, ref = CPUAdam(params, lr=1e-3), torch.optim.AdamW(ref_params, lr=1e-3, fused=True)
    for s in range(3):
        for p, q, g in zip(params, ref_params, _grads(s)):
            p.grad, q.grad = g, g.clone()
        ours.step()
        ref.step()
    for p, q in zip(params, ref_params):
        st, rst = ours.state[p], ref.state[q]
        assert st["step"] == 3 and isinstance(st["step"], int)
        assert st["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(st["exp_avg"], rst["exp_avg"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(st["exp_avg_sq"], rst["exp_avg_sq"], rtol=RTOL, atol=ATOL)


def _reference_adam(p, grads, *, lr, betas, eps, wd, adamw, bias_correction):
    """float64 reference of the update, written from the formula."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if adamw:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        bc1 = 1 - betas[0] ** t if bias_correction else 1.0
        bc2 = 1 - betas[1] ** t if bias_correction else 1.0
        p = p - (lr / bc1) * m / (v.sqrt() / bc2**0.5 + eps)
    return p


@pytest.mark.parametrize("backend", ["c", "torch"])
@pytest.mark.parametrize("adamw_mode", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_flat_step_matches_float64_reference(backend, adamw_mode, bias_correction):
    n = 5000
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(3))
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    for t, g in enumerate(grads, start=1):
        adam_step_flat(p, g, m, v, step=t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05,
                       adamw_mode=adamw_mode, bias_correction=bias_correction, backend=backend)
    ref = _reference_adam(p0, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=0.05, adamw=adamw_mode,
                          bias_correction=bias_correction)
    torch.testing.assert_close(p.double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads_equal_upcast_grads(grad_dtype):
    ours = _run(lambda ps: CPUAdam(ps, lr=1e-2, weight_decay=0.01), grad_dtype=grad_dtype)
    upcast = _run(lambda ps: CPUAdam(ps, lr=1e-2, weight_decay=0.01), grad_dtype=grad_dtype, steps=0)
    params = [p.requires_grad_() for p in upcast]
    ref_opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=True)
    for s in range(20):
        for p, g in zip(params, _grads(s, dtype=grad_dtype)):
            p.grad = g.float()  # the exact upcast the kernel does on the fly
        ref_opt.step()
    for a, b in zip(ours, params):
        torch.testing.assert_close(a, b.detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_lowp_out_is_the_rounded_updated_param(out_dtype, backend):
    n = 4099
    p = torch.randn(n) * 3
    p[:4] = torch.tensor([1.00390625, -1.01171875, 65504.0 * 4, 1e-8])  # ties, fp16 overflow, subnormal
    out = torch.empty(n, dtype=out_dtype)
    adam_step_flat(p, torch.randn(n, dtype=torch.bfloat16), torch.zeros(n), torch.zeros(n), step=1, lr=1e-3,
                   beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adamw_mode=True, bias_correction=True,
                   lowp_out=out, backend=backend)
    assert torch.equal(out, p.to(out_dtype))


def test_thread_count_does_not_change_results():
    sizes = (300_000, 7, 70_001, 16_384)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(_run(lambda ps: CPUAdam(ps, lr=1e-2), steps=3, sizes=sizes))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_many_tensors_one_call_equals_one_call_each():
    params, grads = _params(), _grads(0)
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    singles = [p.clone() for p in params]
    kw = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, adamw_mode=True,
              bias_correction=True)
    adam_step_multi(params, grads, ms, vs, **kw)
    for p, g in zip(singles, grads):
        adam_step_flat(p, g, torch.zeros_like(p), torch.zeros_like(p), **kw)
    for a, b in zip(params, singles):
        assert torch.equal(a, b)


def test_strided_param_takes_the_torch_path_with_same_result():
    base = torch.randn(64, 64)
    strided, contiguous = base.t(), base.t().contiguous()
    g = torch.randn(64, 64)
    kw = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adamw_mode=True,
              bias_correction=True)
    adam_step_multi([strided], [g], [torch.zeros(64, 64)], [torch.zeros(64, 64)], **kw)
    adam_step_multi([contiguous], [g], [torch.zeros(64, 64)], [torch.zeros(64, 64)], **kw)
    torch.testing.assert_close(strided, contiguous, rtol=RTOL, atol=ATOL)


def test_state_dict_round_trip_continues_identically():
    a = _run(lambda ps: CPUAdam(ps, lr=1e-2, weight_decay=0.1), steps=6)
    params = [p.requires_grad_() for p in _params()]
    opt = CPUAdam(params, lr=1e-2, weight_decay=0.1)
    for s in range(3):
        for p, g in zip(params, _grads(s)):
            p.grad = g
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    fresh = CPUAdam(params, lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(saved)
    for s in range(3, 6):
        for p, g in zip(params, _grads(s)):
            p.grad = g
        fresh.step()
    for x, y in zip(a, params):
        assert torch.equal(x, y.detach())


def test_fused_adam_any_dtype_and_l2_mode():
    ours = _run(lambda ps: FusedAdam(ps, lr=1e-2, weight_decay=0.1, adam_w_mode=False))
    ref = _run(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    p64 = torch.randn(100, dtype=torch.float64, requires_grad=True)
    q64 = p64.detach().clone().requires_grad_()
    o1, o2 = FusedAdam([p64], lr=1e-2, weight_decay=0.01), torch.optim.AdamW([q64], lr=1e-2, weight_decay=0.01)
    for _ in range(5):
        g = torch.randn(100, dtype=torch.float64)
        p64.grad, q64.grad = g, g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p64, q64, rtol=1e-12, atol=1e-14)
    assert o1.state[p64]["exp_avg"].dtype == torch.float64


def test_alias_and_errors():
    assert DeepSpeedCPUAdam is CPUAdam
    with pytest.raises(ValueError, match="amsgrad"):
        CPUAdam([torch.zeros(2, requires_grad=True)], amsgrad=True)
    meta = torch.zeros(2, device="meta", requires_grad=True)
    meta.grad = torch.zeros(2, device="meta")
    with pytest.raises(RuntimeError, match="offload_optimizer"):
        CPUAdam([meta]).step()
    with pytest.raises(ValueError, match="same number of elements"):
        adam_step_flat(torch.zeros(4), torch.zeros(3), torch.zeros(4), torch.zeros(4), step=1, lr=1e-3, beta1=0.9,
                       beta2=0.999, eps=1e-8, weight_decay=0.0, adamw_mode=True, bias_correction=True)
    with pytest.raises(ValueError, match="SHARDWISE_CPU_ADAM_BACKEND"):
        backend_name("gpu")


def test_closure_and_skipped_params():
    with_grad, without = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    opt = CPUAdam([with_grad, without], lr=0.1)

    def closure():
        with_grad.grad = torch.ones(3)
        return 7.0

    assert opt.step(closure) == 7.0
    assert torch.all(with_grad < 1) and torch.equal(without.detach(), torch.ones(3))
    assert without not in opt.state


def test_build_cache_atomic_and_failure_reporting(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_CACHE_DIR", str(tmp_path))
    src = tmp_path / "tiny.c"
    src.write_text("int sw_answer(void) { return 42; }\n")
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(build.build("tiny", src))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and paths[0].parent == tmp_path and paths[0].exists()
    assert not list(tmp_path.glob("*.tmp")), "temporary build files must not be left behind"
    src.write_text("int sw_answer(void) { return 43 }\n")  # syntax error
    with pytest.raises(build.KernelBuildError, match="tiny.c"):
        build.build("tiny", src)
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.setenv("CC", "definitely-not-a-compiler")
    assert build.load_kernel("tiny_nocc", src) is None
    assert "no C compiler" in build.build_error("tiny_nocc")
