"""CPUAdam / adam_step_flat: numerics against torch's Adam/AdamW, dtypes, lowp copies, build robustness,
and the threading model: no OpenMP in the kernel library, GIL released during calls, Python-side spans (also under
a gloo collective running beside them on 2 ranks: the one test here that starts ranks, kept with the kernel's
other threading checks)."""

from __future__ import annotations

import copy
import ctypes
import os
import shutil
import struct
import subprocess
import threading
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from shardwise.ops import build
from shardwise.ops.adam import CPUAdam, DeepSpeedCPUAdam, FusedAdam, adam_step_flat, adam_step_multi, backend_name
from shardwise.ops.adam import cpu_adam as cpu_adam_mod
from tests.dist import run_ranks

SIZES = (1, 15, 16, 17, 1000, 40_000)  # vector tails, one block, several threads' worth
RTOL, ATOL = 1e-6, 1e-7
#: bound on waits that only a hang reaches (a thread or process that will never finish); never a speed claim
HANG_GUARD_S = 300.0
NEVER_IDLE_NS = 1 << 62  # a helper started with this serves until it is no longer wanted
MAX_STEPS_FOR_A_HELPER = 2000


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


def _tiny_chunks(monkeypatch) -> None:
    """Share every step with helpers, down to 16-element chunks at the end of each step. Up to 8 threads even on
    fewer CPUs (the product caps threads at the CPU count; oversubscribed here only for coverage)."""
    monkeypatch.setattr(cpu_adam_mod, "MIN_PARALLEL", 16)
    monkeypatch.setattr(cpu_adam_mod, "MIN_CHUNK", 16)
    monkeypatch.setattr(cpu_adam_mod, "_cpus", lambda: 8)


@pytest.mark.parametrize("tiny_chunks", [False, True], ids=["default-threshold", "tiny-chunks"])
def test_thread_count_does_not_change_results(tiny_chunks, monkeypatch):
    if tiny_chunks:
        _tiny_chunks(monkeypatch)
    sizes = (cpu_adam_mod.MIN_PARALLEL + 2 * cpu_adam_mod.MIN_CHUNK + 3, 7, 70_001, 16_384, 1, 0, 33)
    results = []
    for threads in (1, 2, 3, 5):
        torch.set_num_threads(threads)
        results.append(_run(lambda ps: CPUAdam(ps, lr=1e-2, weight_decay=0.1), steps=3, sizes=sizes))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_every_element_is_updated_exactly_once_with_many_threads(monkeypatch):
    """Each element's lowp_out copy is written by the pass that updated it; a missed element keeps its NaN, one
    updated twice differs from the single-thread result."""
    _tiny_chunks(monkeypatch)
    sizes = [1, 15, 16, 17, 1000, 4099, 0, 40_000, 31]
    kw = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, adamw_mode=True,
              bias_correction=True)
    results = []
    for threads in (1, 4):
        torch.set_num_threads(threads)
        params, grads = _params(sizes=sizes), _grads(0, sizes, torch.bfloat16)
        ms, vs = [torch.full_like(p, 0.1) for p in params], [torch.full_like(p, 0.2) for p in params]
        outs = [torch.full_like(p, float("nan")) for p in params]
        adam_step_multi(params, grads, ms, vs, lowp_outs=outs, backend="c", **kw)
        assert all(torch.equal(o, p) for o, p in zip(outs, params))
        results.append(params + ms + vs)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("helpers", [0, 1, 3])
def test_team_chunks_meet_every_tensor_boundary(helpers, monkeypatch):
    """sw_team_adam with nshares so large that every chunk is 16 elements: chunk edges then fall at every
    alignment inside and at the ends of tensors of many sizes, and helpers (if any) grab chunks in between.
    Every element is updated exactly once (same bits as the one-thread kernel) and written to lowp_out before
    the call returns."""
    monkeypatch.setattr(cpu_adam_mod, "_pool", {"executor": None, "workers": 0})  # a private pool
    lib = cpu_adam_mod._kernel()
    team = cpu_adam_mod._Team(lib)
    sizes = [1, 15, 16, 17, 1000, 4099, 0, 31, 33, 47, 2, 64, 18]
    hyper = (0, 0, 4, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1, 1)  # fp32 grads, fp32 out, step 4, AdamW
    for rep in range(3):
        if helpers:
            team.recruit(helpers)
        case = [_params(rep, sizes), _grads(rep, sizes), [torch.full((n,), 0.1) for n in sizes],
                [torch.full((n,), 0.2) for n in sizes]]
        ref = [[t.clone() for t in ts] for ts in case]
        outs = [torch.full((n,), float("nan")) for n in sizes]
        numels = array("q", sizes)
        arrays = [array("Q", [t.data_ptr() for t in ts]) for ts in (*case, outs)]
        addrs = [a.buffer_info()[0] for a in arrays]
        assert lib.sw_team_adam(team.state, len(sizes), *addrs, numels.buffer_info()[0], *hyper, 16, 1 << 30) == 0
        assert all(torch.equal(o, p) for o, p in zip(outs, case[0])), "an element was not written by return"
        ref_arrays = [array("Q", [t.data_ptr() for t in ts]) for ts in ref]  # one thread, no lowp copy
        assert lib.sw_adam_multi(len(sizes), *(a.buffer_info()[0] for a in ref_arrays), None,
                                 numels.buffer_info()[0], *hyper) == 0
        for got, want in zip(case, ref):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    if cpu_adam_mod._pool["executor"] is not None:
        cpu_adam_mod._pool["executor"].shutdown(wait=True)  # helpers leave after IDLE_NS without work


def test_a_serving_helper_takes_chunks_and_the_step_is_complete_on_return():
    """A helper already serving takes chunks of the caller's steps, and when each call returns every element was
    updated exactly once: the fp32 copy written in the same pass is complete (a chunk still running would leave
    NaNs), and param, exp_avg and exp_avg_sq equal a one-thread run bit for bit (a chunk run twice would move m and
    v twice). The test starts the helper itself and it serves until it is no longer wanted (it never idles out),
    so nothing depends on how fast or how busy the machine is. Which steps the helper wins a chunk of is up to the
    scheduler, so steps repeat until it has taken chunks (a bounded count: a spinning, runnable thread gets the
    CPU long before that on any machine). (The 2-rank stress test below catches callers that do not wait.)"""
    lib = cpu_adam_mod._kernel()
    team = cpu_adam_mod._Team(lib)  # a private team: no helper of another test can serve it
    assert lib.sw_team_recruit(team.state, 1) == 1  # one helper wanted; this test starts it
    helper = threading.Thread(target=lib.sw_team_serve, args=(team.state, NEVER_IDLE_NS), daemon=True)
    helper.start()
    while lib.sw_team_serving(team.state) == 0:  # whenever the scheduler first runs it
        assert helper.is_alive(), "the helper thread ended before it served"
        os.sched_yield()
    n = 1 << 18
    p, m, v = _adam_case(0, n)
    ref = [t.clone() for t in (p, m, v)]
    out = torch.empty(n)
    gen = torch.Generator().manual_seed(5)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adamw_mode=True, bias_correction=True)
    try:
        step = 0
        while lib.sw_team_helped(team.state) == 0 and step < MAX_STEPS_FOR_A_HELPER:
            step += 1
            g = torch.randn(n, generator=gen)
            out.fill_(float("nan"))
            assert lib.sw_team_adam_flat(team.state, n, p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                                         out.data_ptr(), 0, 0, step, kw["lr"], kw["beta1"], kw["beta2"], kw["eps"],
                                         kw["weight_decay"], 1, 1, 256, 2) == 0
            missing = int(torch.isnan(out).sum())
            assert missing == 0, f"step {step}: {missing} elements still unwritten when the call returned"
            torch.set_num_threads(1)  # the reference: the caller alone, the one-thread kernel
            adam_step_flat(ref[0], g, ref[1], ref[2], step=step, backend="c", **kw)
            assert all(torch.equal(a, b) for a, b in zip((p, m, v), ref)), f"step {step}: differs from one thread"
        assert lib.sw_team_helped(team.state) > 0, f"the serving helper took no chunk in {step} steps"
    finally:
        lib.sw_team_recruit(team.state, 0)  # no longer wanted: it leaves at its next look at the team
        helper.join(HANG_GUARD_S)
    assert not helper.is_alive(), "the helper did not leave once no helper was wanted"


def test_one_thread_or_small_steps_never_touch_the_pool(monkeypatch):
    def no_team(lib):
        raise AssertionError("the helper team must not be used here")

    monkeypatch.setattr(cpu_adam_mod, "_team", no_team)
    n = 4 * cpu_adam_mod.MIN_PARALLEL
    kw = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adamw_mode=True,
              bias_correction=True)
    torch.set_num_threads(1)
    adam_step_flat(torch.zeros(n), torch.ones(n), torch.zeros(n), torch.zeros(n), **kw)
    torch.set_num_threads(2)
    small = cpu_adam_mod.MIN_PARALLEL - 1
    adam_step_flat(torch.zeros(small), torch.ones(small), torch.zeros(small), torch.zeros(small), **kw)
    with pytest.raises(AssertionError, match="helper team"):  # and the guard itself works
        adam_step_flat(torch.zeros(n), torch.ones(n), torch.zeros(n), torch.zeros(n), **kw)


def test_a_helper_that_never_starts_does_not_stall_the_step(monkeypatch):
    """The caller does every chunk itself when no helper comes, and does not start a second helper per step. The
    only pool thread stays busy until the steps have returned, so the helper cannot have run: had a step waited
    for it, the steps would never return (caught by the hang guard, not by a clock)."""
    _tiny_chunks(monkeypatch)
    monkeypatch.setattr(cpu_adam_mod, "_teams", {})  # a fresh team: no helper left over from other tests
    release = threading.Event()
    submitted = []

    class Stuck(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            submitted.append(fn)
            return super().submit(fn, *args, **kwargs)

    stuck = Stuck(max_workers=1)
    ThreadPoolExecutor.submit(stuck, release.wait)  # the only pool thread is busy elsewhere until released
    monkeypatch.setattr(cpu_adam_mod, "_executor", lambda workers: stuck)
    torch.set_num_threads(2)
    p, m, v = _adam_case(0, 50_000)
    errors: list[BaseException] = []

    def three_steps() -> None:
        try:
            _steps(p, m, v, 3, 0)  # checks each step's output is complete when the call returns
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    stepper = threading.Thread(target=three_steps, daemon=True)
    try:
        stepper.start()
        stepper.join(HANG_GUARD_S)
        assert not stepper.is_alive(), "the step waited for a helper that never started"
        assert errors == []
        team = next(iter(cpu_adam_mod._teams.values()))
        assert team.lib.sw_team_helped(team.state) == 0  # the caller did every chunk: the helper never ran
        assert len(submitted) == 1, "the helper still on its way must be counted, not started again"
    finally:
        release.set()
        stuck.shutdown(wait=True)  # the late helper serves, finds nothing to do, and leaves
    torch.set_num_threads(1)
    q, mq, vq = _adam_case(0, 50_000)
    _steps(q, mq, vq, 3, 0)
    assert torch.equal(p, q) and torch.equal(m, mq) and torch.equal(v, vq)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_pool_is_rebuilt_in_a_forked_child(monkeypatch):
    """A forked child has no pool threads; without the at-fork reset its first split step would wait forever."""
    _tiny_chunks(monkeypatch)
    torch.set_num_threads(2)
    n = 4096  # small enough that torch's own ops in the child stay single-threaded
    p, m, v = _adam_case(0, n)
    _steps(p, m, v, 2, 0)  # the parent's pool now exists
    assert cpu_adam_mod._pool["executor"] is not None
    expected = [t.clone() for t in (p, m, v)]
    q, mq, vq = _adam_case(0, n)
    pid = os.fork()
    if pid == 0:  # child: only our kernel and tiny tensor ops, then leave at once
        code = 1
        try:
            _steps(q, mq, vq, 2, 0)
            code = 0 if all(torch.equal(a, b) for a, b in zip((q, mq, vq), expected)) else 2
        finally:
            os._exit(code)
    result: list[int] = []
    waiter = threading.Thread(target=lambda: result.append(os.waitpid(pid, 0)[1]), daemon=True)
    waiter.start()
    waiter.join(HANG_GUARD_S)
    if not result:
        os.kill(pid, 9)
        waiter.join(5)
        pytest.fail("the forked child hung in its first threaded step")
    status = result[0]
    assert os.waitstatus_to_exitcode(status) == 0


def _elf_dynamic_info(path: str | Path) -> tuple[list[str], set[str]]:
    """(DT_NEEDED libraries, undefined dynamic symbols) of a 64-bit little-endian ELF file."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        pytest.skip(f"{path} is not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # (name, type, flags, addr, offset, size, link, info, addralign, entsize)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def cstr(strtab: tuple, offset: int) -> str:
        start = strtab[4] + offset
        return data[start : data.index(b"\0", start)].decode()

    needed, undefined = [], set()
    for sec in sections:
        if sec[1] == 6:  # SHT_DYNAMIC: (tag, value) pairs; DT_NEEDED = 1
            for off in range(sec[4], sec[4] + sec[5], 16):
                tag, val = struct.unpack_from("<qQ", data, off)
                if tag == 1:
                    needed.append(cstr(sections[sec[6]], val))
        elif sec[1] == 11:  # SHT_DYNSYM: 24-byte symbols; section index 0 = undefined
            for off in range(sec[4] + sec[9], sec[4] + sec[5], sec[9]):
                name, _info, _other, shndx = struct.unpack_from("<IBBH", data, off)
                if shndx == 0 and name:
                    undefined.add(cstr(sections[sec[6]], name))
    return needed, undefined


def _openmp_refs(path: str | Path) -> list[str]:
    needed, undefined = _elf_dynamic_info(path)
    libs = [n for n in needed if any(k in n for k in ("gomp", "iomp", "libomp"))]
    return libs + sorted(s for s in undefined if s.startswith(("GOMP_", "omp_", "__kmpc_")))


def test_kernel_library_does_not_depend_on_openmp(tmp_path):
    lib = cpu_adam_mod._kernel()
    assert lib is not None, build.build_error(cpu_adam_mod.KERNEL_NAME)
    assert "-fopenmp" not in build.DEFAULT_FLAGS and all("-fopenmp" not in f for f in build._flag_variants())
    assert _openmp_refs(lib._name) == [], f"{lib._name} still links an OpenMP runtime"
    assert not lib.sw_capabilities() & 2
    # the reader is not blind: a library built with -fopenmp shows its runtime
    src, out = tmp_path / "omp.c", tmp_path / "omp.so"
    src.write_text("int sw_sum(const int* x, int n) { int s = 0;\n"
                   "#pragma omp parallel for reduction(+ : s)\n"
                   "for (int i = 0; i < n; ++i) s += x[i];\nreturn s; }\n")
    proc = subprocess.run([build.find_compiler(), *build.DEFAULT_FLAGS, "-fopenmp", "-o", str(out), str(src)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"the compiler cannot build OpenMP code here: {proc.stderr[-300:]}")
    assert any("omp" in r.lower() for r in _openmp_refs(out)), _elf_dynamic_info(out)
    if shutil.which("readelf"):  # cross-check the reader against binutils where present
        text = subprocess.run(["readelf", "-d", lib._name], capture_output=True, text=True, timeout=30).stdout
        assert [line.split("[")[1].rstrip("]") for line in text.splitlines() if "(NEEDED)" in line] == \
            _elf_dynamic_info(lib._name)[0]


def test_default_build_refuses_openmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_CACHE_DIR", str(tmp_path))
    with pytest.raises(build.KernelBuildError, match="without -fopenmp"):
        build.build("cpu_adam_omp", build.CSRC_DIR / "cpu_adam.c", (*build.DEFAULT_FLAGS, "-fopenmp"))


def test_kernel_calls_release_the_gil():
    """Python code runs while another thread is inside the kernel (ctypes.CDLL releases the GIL, PyDLL would not).

    One foreign call sweeps the same small tensor 512 times. Mid-sweep its first and last elements have been
    updated a different number of times; a thread that can only run between foreign calls (GIL held during them)
    never sees that, one that runs during the call sees it almost every time it looks.
    """
    lib = cpu_adam_mod._kernel()
    assert isinstance(lib, ctypes.CDLL) and not isinstance(lib, ctypes.PyDLL)
    assert not lib._func_flags_ & ctypes._FUNCFLAG_PYTHONAPI
    n, k = 1 << 16, 512
    p, g, m, v = torch.zeros(n), torch.ones(n), torch.zeros(n), torch.zeros(n)
    ptrs = [array("Q", [t.data_ptr()] * k) for t in (p, g, m, v)]
    numels = array("q", [n] * k)
    args = (k, *(a.buffer_info()[0] for a in ptrs), None, numels.buffer_info()[0], 0, -1, 1, 1e-3, 0.9, 0.999, 1e-8,
            0.0, 1, 1)
    mid_sweep = looks = 0
    for _ in range(5):  # a busy machine may keep this thread off the CPU for one whole call, hardly for five
        worker = threading.Thread(target=lambda: lib.sw_adam_multi(*args))
        worker.start()
        while worker.is_alive():
            looks += 1
            mid_sweep += float(p[0]) != float(p[-1])
        worker.join()
        assert float(p[0]) == float(p[-1])  # every sweep completed
        if mid_sweep:
            break
    assert mid_sweep > 0, f"no Python ran during {looks} looks at the tensor while the kernel was running"


def _adam_case(seed: int, n: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)


def _steps(p, m, v, steps: int, seed: int) -> None:
    """``steps`` kernel steps; after each, the fp32 copy written in the same pass must be complete and equal to
    the param (so every span, including those run by pool threads, finished before the call returned)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    out = torch.empty_like(p)
    for t in range(1, steps + 1):
        g = torch.randn(p.numel(), generator=gen)
        out.fill_(float("nan"))
        adam_step_flat(p, g, m, v, step=t, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                       adamw_mode=True, bias_correction=True, lowp_out=out, backend="c")
        if not torch.equal(out, p):
            raise AssertionError(f"step {t}: {int(torch.isnan(out).sum())} elements not written when the call returned")


def _kernel_threads_beside_gloo(callers: int, steps: int, n: int) -> dict:
    """On each rank: gloo all-reduces in a background thread while ``callers`` Python threads step their own
    tensors through the pooled kernel (spans forced small); then the same steps serially on one thread."""
    import torch.distributed as dist

    cpu_adam_mod.MIN_PARALLEL = cpu_adam_mod.MIN_CHUNK = 256  # every step is shared with a helper
    torch.set_num_threads(2)
    stop, reduced, errors = threading.Event(), [0], []

    def collectives():
        # x[0] carries "my callers are done": both ranks see the same sum, so both leave on the same iteration
        x = torch.ones(1024)
        while reduced[0] < 100_000:
            x.fill_(1.0)
            x[0] = float(stop.is_set())
            dist.all_reduce(x)
            if not torch.all(x[1:] == 2):
                errors.append(AssertionError(f"all_reduce gave {x[1:].unique()} instead of 2"))
                break
            reduced[0] += 1
            if x[0] == 2:
                break

    def caller(i):
        try:
            _steps(*states[i], steps, i)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)

    states = [_adam_case(i, n) for i in range(callers)]
    background = threading.Thread(target=collectives)
    background.start()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S / 3)  # hang guards: a caller or the collectives that never finish
    stop.set()
    background.join(HANG_GUARD_S / 3)
    torch.set_num_threads(1)
    serial = [_adam_case(i, n) for i in range(callers)]
    for i, s in enumerate(serial):
        _steps(*s, steps, i)
    same = all(torch.equal(a, b) for st, se in zip(states, serial) for a, b in zip(st, se))
    return {"errors": [repr(e) for e in errors], "same": same, "alive": [t.is_alive() for t in threads],
            "reduced": reduced[0]}


def test_pooled_kernel_beside_gloo_collectives_on_two_ranks():
    results = run_ranks(_kernel_threads_beside_gloo, 3, 500, 16_384, timeout=HANG_GUARD_S)
    for rank, r in enumerate(results):
        assert r["errors"] == [] and not any(r["alive"]), (rank, r)
        assert r["same"], f"rank {rank}: threaded results differ from the serial run"
        assert r["reduced"] > 0, f"rank {rank}: no collective ran beside the kernel"


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
