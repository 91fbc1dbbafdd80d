"""Fast Adam/AdamW step on CPU: ``CPUAdam`` (DeepSpeed's ``DeepSpeedCPUAdam``) and ``adam_step_flat``.

Owns the CPU Adam update used by ZeRO-Offload and by ``build_optimizer(..., offload=True)``: one
fused pass per element over fp32 master weights and optimizer state, done by a small C kernel
(``shardwise/ops/csrc/cpu_adam.c``, built on first use by :mod:`shardwise.ops.build`), with a
torch fallback (``torch._fused_adam(w)_``, or ``_foreach`` ops) when no compiler is available.

Why a kernel of our own: torch's fused CPU Adam is a good single-pass kernel, but it is one
parallel region per tensor and leaves some memory bandwidth unused. The C kernel walks a list of
tensors as one flat range shared between threads, prefetches ahead of its four read streams, and can
write a bf16/fp16 copy of the updated weight in the same pass, which the offload path needs to send
the new weights back to the accelerator without a second sweep over memory. See
``benchmarks/bench_cpu_adam.py`` for the measured ratio against ``torch.optim.AdamW(fused=True)``.

Threads: the kernel is built without OpenMP; large steps are shared with helper threads of a
persistent ``ThreadPoolExecutor`` (see [Note: CPU Adam threads] below).

Numerics match ``torch.optim.Adam``/``AdamW``: eps is added after the square root of the
bias-corrected second moment (``denom = sqrt(v) / sqrt(1 - beta2^t) + eps``), bias corrections are
computed in double, L2 (``adamw_mode=False``) adds ``wd * p`` to the gradient, AdamW scales the
weight by ``1 - lr * wd``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from array import array
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from shardwise.ops.build import build_error, load_kernel

logger = logging.getLogger(__name__)

KERNEL_NAME = "cpu_adam"
BACKEND_ENV = "SHARDWISE_CPU_ADAM_BACKEND"  # "auto" (default) | "c" | "torch"

_GRAD_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OUT_CODES = {None: -1, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_D = ctypes.c_double
_I = ctypes.c_int
# gdtype, odtype, step, lr, beta1, beta2, eps, weight_decay, adamw_mode, bias_correction
_HYPER_ARGTYPES = [_I, _I, _I64, _D, _D, _D, _D, _D, _I, _I]

_kernel_state: dict[str, object] = {}


_SIGNATURES: dict[str, tuple[type | None, list]] = {
    "sw_capabilities": (_I, []),
    "sw_adam_flat": (_I, [_I64, _P, _P, _P, _P, _P, *_HYPER_ARGTYPES]),
    "sw_adam_multi": (_I, [_I64, _P, _P, _P, _P, _P, _P, *_HYPER_ARGTYPES]),
    # team: state, then the same arguments as above, then min_chunk and nshares
    "sw_team_adam_flat": (_I, [_P, _I64, _P, _P, _P, _P, _P, *_HYPER_ARGTYPES, _I64, _I64]),
    "sw_team_adam": (_I, [_P, _I64, _P, _P, _P, _P, _P, _P, *_HYPER_ARGTYPES, _I64, _I64]),
    "sw_team_size": (_I64, []),
    "sw_team_init": (None, [_P]),
    "sw_team_recruit": (_I64, [_P, _I64]),
    "sw_team_serve": (_I, [_P, _I64]),
    "sw_team_serving": (_I64, [_P]),
    "sw_team_helped": (_I64, [_P]),
}


def _declare(lib: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


def _kernel() -> ctypes.CDLL | None:
    """The loaded C library with argtypes declared, or None; logs the chosen path once."""
    if "lib" in _kernel_state:
        return _kernel_state["lib"]  # type: ignore[return-value]
    lib = load_kernel(KERNEL_NAME)
    if lib is not None:
        _declare(lib)
        caps = lib.sw_capabilities()
        if not caps & 1:
            _GRAD_CODES.pop(torch.float16, None)
            _OUT_CODES.pop(torch.float16, None)
        logger.info("shardwise CPU Adam: using the C kernel (fp16=%s)", bool(caps & 1))
    else:
        logger.warning("shardwise CPU Adam: using the torch fallback (torch._fused_adam(w)_)")
    _kernel_state["lib"] = lib
    return lib


def _resolve(backend: str | None) -> ctypes.CDLL | None:
    choice = (backend or os.environ.get(BACKEND_ENV, "auto")).lower()
    if choice == "torch":
        return None
    if choice not in ("auto", "c"):
        raise ValueError(f"{BACKEND_ENV}={choice!r} is not one of 'auto', 'c', 'torch'")
    lib = _kernel()
    if lib is None and choice == "c":
        raise RuntimeError(
            f"the CPU Adam C kernel was requested ({BACKEND_ENV}=c) but could not be built: "
            f"{build_error(KERNEL_NAME)}; install gcc or set {BACKEND_ENV}=auto"
        )
    return lib


def backend_name(backend: str | None = None) -> str:
    """``"c"`` if steps run in the C kernel, ``"torch"`` if in the fallback."""
    return "c" if _resolve(backend) is not None else "torch"


def _check_numels(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, o) -> None:
    n = p.numel()
    if g.numel() != n or m.numel() != n or v.numel() != n or (o is not None and o.numel() != n):
        sizes = f"param {n}, grad {g.numel()}, exp_avg {m.numel()}, exp_avg_sq {v.numel()}"
        if o is not None:
            sizes += f", lowp_out {o.numel()}"
        raise ValueError(f"adam step: tensors must have the same number of elements ({sizes})")


def _kernel_key(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, o) -> tuple | None:
    """(grad code, out code) if the C kernel can update this tensor, else None.

    Written as one flat chain of cheap attribute checks: with thousands of small tensors this
    test runs once per tensor per step, so it must stay well under a microsecond.
    """
    f32 = torch.float32
    if not (p.dtype is f32 and m.dtype is f32 and v.dtype is f32 and p.is_cpu and g.is_cpu and m.is_cpu
            and v.is_cpu):
        return None
    gcode = _GRAD_CODES.get(g.dtype)
    if gcode is None or not (p.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
        return None
    if o is None:
        return gcode, -1
    ocode = _OUT_CODES.get(o.dtype)
    if ocode is None or not (o.is_cpu and o.is_contiguous()):
        return None
    return gcode, ocode


def adam_step_multi(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw_mode: bool,
    bias_correction: bool,
    lowp_outs: Sequence[torch.Tensor | None] | None = None,
    backend: str | None = None,
) -> None:
    """One in-place Adam(W) step on lists of tensors that share ``step`` and hyperparameters.

    ``step`` is the 1-based step number after incrementing. fp32 contiguous CPU params and state
    with fp32/bf16/fp16 grads go to the C kernel in one call per (grad dtype, out dtype); anything
    else (other dtypes or devices, strided params) takes the torch path. ``lowp_outs[i]``, when not
    None, receives a copy of the updated ``params[i]`` in its own dtype (bf16/fp16/fp32).
    """
    outs = list(lowp_outs) if lowp_outs is not None else [None] * len(params)
    hyper = dict(step=int(step), lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), adamw_mode=bool(adamw_mode),
                 bias_correction=bool(bias_correction))
    lib = _resolve(backend)
    buckets: dict[tuple, list] = {}
    rest: list[tuple] = []
    for item in zip(params, grads, exp_avgs, exp_avg_sqs, outs):
        _check_numels(*item)
        key = _kernel_key(*item) if lib is not None else None
        if key is None:
            rest.append(item)
        else:
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = []
            bucket.append(item)
    for (gcode, ocode), items in buckets.items():
        _run_kernel(lib, items, gcode, ocode, hyper)
    if rest:
        _torch_adam(*zip(*rest), **hyper)


# -- threading: helpers from a persistent pool, handed steps through shared memory ----------------------------
# [Note: CPU Adam threads] The kernel is C without OpenMP (a second OpenMP runtime beside torch's, next to
# gloo's threads, is a risk for no gain), and it creates no thread. Parallelism comes from here: a step of at
# least MIN_PARALLEL elements is shared by the calling thread and torch.get_num_threads() - 1 helper threads
# of a persistent ThreadPoolExecutor. A helper runs sw_team_serve() (ctypes.CDLL: the GIL is released for
# the whole call), which takes part in every step published while it waits and returns after IDLE_NS without
# one; the caller's sw_team_adam() claims contiguous, cache-line aligned chunks along with the helpers and
# returns once all are done (protocol: [Note: CPU Adam team] in cpu_adam.c). Handing a step over through a
# queue or a Future instead costs 30-90 us per wake-up on this VM, as much as the whole gain at 1M elements;
# a step published while no helper serves is done by the caller alone, helped by any that arrives late.
MIN_PARALLEL = 1 << 17
MIN_CHUNK = 1 << 14
IDLE_NS = 200_000  # a helper waits (spinning) this long for the next step before going back to the pool

_pool_lock = threading.Lock()
_pool: dict[str, ThreadPoolExecutor | int | None] = {"executor": None, "workers": 0}
_teams: dict[int, _Team] = {}


def _reset_after_fork() -> None:
    """A forked child has none of the parent's pool threads (and maybe a held lock): start afresh."""
    global _pool_lock
    _pool_lock = threading.Lock()
    _pool.clear()
    _pool.update(executor=None, workers=0)
    _teams.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _executor(workers: int) -> ThreadPoolExecutor:
    """The shared pool, grown to at least ``workers`` threads (created on first use)."""
    ex = _pool["executor"]
    if ex is not None and _pool["workers"] >= workers:  # type: ignore[operator]
        return ex  # type: ignore[return-value]
    with _pool_lock:
        ex = _pool["executor"]
        if ex is None or _pool["workers"] < workers:  # type: ignore[operator]
            old = ex
            ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardwise-cpu-adam")
            _pool.update(executor=ex, workers=workers)
            if old is not None:
                old.shutdown(wait=False)  # its helpers finish serving, then its threads exit
        return ex  # type: ignore[return-value]


class _Team:
    """This process's helper team: the C state, and a lock so that one caller at a time uses it."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.state = (ctypes.c_int64 * ((lib.sw_team_size() + 7) // 8))()  # 8-byte aligned for the atomics
        lib.sw_team_init(self.state)
        self.lock = threading.Lock()

    def serve(self) -> int:
        """Pool-thread task; running as a bound method keeps ``state`` alive while a helper uses it."""
        return self.lib.sw_team_serve(self.state, IDLE_NS)

    def recruit(self, helpers: int) -> None:
        """Make sure ``helpers`` helpers are serving or on their way (extra ones leave by themselves)."""
        missing = self.lib.sw_team_recruit(self.state, helpers)
        if missing > 0:
            ex = _executor(helpers)
            for _ in range(missing):
                ex.submit(self.serve)


def _team(lib: ctypes.CDLL) -> _Team:
    team = _teams.get(id(lib))
    if team is None:
        with _pool_lock:
            team = _teams.setdefault(id(lib), _Team(lib))
    return team


def _cpus() -> int:
    """CPUs this process may run on: helpers spin while they wait, so never more threads than CPUs."""
    if "cpus" not in _pool:
        try:
            _pool["cpus"] = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            _pool["cpus"] = os.cpu_count() or 1
    return _pool["cpus"]  # type: ignore[return-value]


def run_step(lib: ctypes.CDLL, flat: bool, head: tuple, total: int) -> int:
    """Run one kernel step of ``total`` elements (``head``: the sw_adam_flat/multi arguments).

    Uses ``torch.get_num_threads()`` threads, at most one per CPU the process may run on; the
    calling thread alone when that is 1, when the step is below :data:`MIN_PARALLEL`, or when
    another thread is using the team right now. Returns the kernel's return code.
    """
    nthreads = min(torch.get_num_threads(), _cpus())
    if nthreads > 1 and total >= MIN_PARALLEL:
        team = _team(lib)
        if team.lock.acquire(blocking=False):
            try:
                team.recruit(nthreads - 1)
                fn = lib.sw_team_adam_flat if flat else lib.sw_team_adam
                return fn(team.state, *head, MIN_CHUNK, nthreads)
            finally:
                team.lock.release()
    return (lib.sw_adam_flat if flat else lib.sw_adam_multi)(*head)


def _ptrs(tensors) -> array:
    """Data pointers packed in a C array of uint64 (array.array is ~8x faster than ctypes arrays)."""
    return array("Q", [t.data_ptr() for t in tensors])


def _run_kernel(lib: ctypes.CDLL, items: list, gcode: int, ocode: int, hyper: dict) -> None:
    h = hyper
    args = (gcode, ocode, h["step"], h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"],
            int(h["adamw_mode"]), int(h["bias_correction"]))
    if len(items) == 1:  # the ZeRO case: one flat partition, no pointer arrays to build
        p, g, m, v, o = items[0]
        g = g.contiguous()
        flat, total = True, p.numel()
        head = (total, p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), None if o is None else o.data_ptr())
    else:
        ps, gs, ms, vs, os_ = zip(*items)
        gs = [g.contiguous() for g in gs]
        numels = array("q", [p.numel() for p in ps])
        arrays = [_ptrs(ps), _ptrs(gs), _ptrs(ms), _ptrs(vs), _ptrs(os_) if ocode >= 0 else None, numels]
        flat, total = False, sum(numels)
        head = (len(items), *(None if a is None else a.buffer_info()[0] for a in arrays))
    rc = run_step(lib, flat, head + args, total)  # returns only when every thread is done with the tensors
    if rc != 0:
        raise RuntimeError(f"cpu_adam kernel rejected grad dtype code {gcode} / output code {ocode} (rc {rc})")


def _torch_adam(params, grads, exp_avgs, exp_avg_sqs, outs, *, step, lr, beta1, beta2, eps, weight_decay,
                adamw_mode, bias_correction) -> None:
    """The same update with torch ops: fused kernels when they apply, else ``_foreach`` math."""
    work = [p if p.dtype == m.dtype else p.to(m.dtype) for p, m in zip(params, exp_avgs)]
    grads = [g if g.dtype == w.dtype and g.device == w.device else g.to(w) for g, w in zip(grads, work)]
    grads = [g if g.shape == w.shape else g.reshape(w.shape) for g, w in zip(grads, work)]
    # flat state for a shaped param (or the reverse): views share storage, so updates land in place
    exp_avgs = [m if m.shape == w.shape else m.view(w.shape) for m, w in zip(exp_avgs, work)]
    exp_avg_sqs = [v if v.shape == w.shape else v.view(w.shape) for v, w in zip(exp_avg_sqs, work)]
    done = False
    fused = torch._fused_adamw_ if adamw_mode else torch._fused_adam_
    # torch's fused kernels walk raw memory, so they need one layout for all four tensors; the
    # _foreach ops go through TensorIterator and handle any strides.
    same_layout = all(t.is_contiguous() for ts in (work, grads, exp_avgs, exp_avg_sqs) for t in ts)
    if bias_correction and same_layout and hasattr(torch, "_fused_adamw_"):
        try:
            step_t = {w.device: torch.tensor(float(step), device=w.device) for w in work}
            steps = [step_t[w.device] for w in work]  # read-only in the kernel: one per device
            fused(work, grads, list(exp_avgs), list(exp_avg_sqs), [], steps, lr=lr, beta1=beta1, beta2=beta2,
                  weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
            done = True
        except (RuntimeError, NotImplementedError):  # device/dtype without a fused kernel
            done = False
    if not done:
        _foreach_adam(work, grads, list(exp_avgs), list(exp_avg_sqs), step=step, lr=lr, beta1=beta1,
                      beta2=beta2, eps=eps, weight_decay=weight_decay, adamw_mode=adamw_mode,
                      bias_correction=bias_correction)
    for p, w, o in zip(params, work, outs):
        if w is not p:
            p.copy_(w)
        if o is not None:
            o.copy_(w)


def _foreach_adam(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decay,
                  adamw_mode, bias_correction) -> None:
    bc1 = 1.0 - beta1**step if bias_correction else 1.0
    bc2 = 1.0 - beta2**step if bias_correction else 1.0
    if weight_decay != 0.0:
        if adamw_mode:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2**0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / bc1)


def adam_step_flat(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw_mode: bool,
    bias_correction: bool,
    lowp_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One in-place Adam(W) step on a flat fp32 partition (the ZeRO-Offload entry point).

    ``param``, ``exp_avg`` and ``exp_avg_sq`` are fp32 CPU tensors updated in place; ``grad`` may be
    fp32, bf16 or fp16; ``step`` is the 1-based step number. If ``lowp_out`` is given (bf16, fp16 or
    fp32, same number of elements) it receives the updated weight in the same pass, rounded to
    nearest-even exactly as ``lowp_out.copy_(param)`` would.
    """
    adam_step_multi([param], [grad], [exp_avg], [exp_avg_sq], step=step, lr=lr, beta1=beta1, beta2=beta2,
                    eps=eps, weight_decay=weight_decay, adamw_mode=adamw_mode,
                    bias_correction=bias_correction, lowp_outs=[lowp_out], backend=backend)


class AdamBase(torch.optim.Optimizer):
    """Shared Adam/AdamW machinery of :class:`CPUAdam` and ``FusedAdam``: state layout, step loop.

    Parameters with gradients are batched per group and per step count and handed to
    :func:`adam_step_multi`, which sends fp32 CPU tensors to the C kernel and everything else to
    torch's fused kernels. Subclasses choose the state dtype and which devices they accept.
    """

    fp32_optimizer_states = True

    def __init__(self, model_params: Iterable, *, lr: float, bias_correction: bool, betas: tuple[float, float],
                 eps: float, weight_decay: float, amsgrad: bool, adamw_mode: bool) -> None:
        if amsgrad:
            raise ValueError(f"{type(self).__name__} does not support amsgrad=True (neither does DeepSpeed's); "
                             "remove 'amsgrad' or use torch.optim.AdamW(amsgrad=True)")
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {tuple(betas)}: each must be in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, amsgrad=False)
        super().__init__(model_params, defaults)
        self.adam_w_mode = bool(adamw_mode)
        #: ``{id(param): tensor}``: the step also writes the updated param into that tensor, in its dtype, in
        #: the same pass (how ZeRO's unpartitioned fp32 master publishes the model's bf16/fp16 weights)
        self.lowp_outs: dict[int, torch.Tensor] = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("lowp_outs", {})
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("bias_correction", True)

    def _check_param(self, p: torch.Tensor) -> None:
        """Validate a parameter when its state is created (once, not every step)."""

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        self._check_param(p)
        dtype = torch.float32 if self.fp32_optimizer_states else p.dtype
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_step: dict[int, tuple[list, list, list, list, list]] = {}
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state)
                step = state["step"] = state["step"] + 1
                lists = by_step.get(step)
                if lists is None:
                    lists = by_step[step] = ([], [], [], [], [])
                lists[0].append(p)
                lists[1].append(grad)
                lists[2].append(state["exp_avg"])
                lists[3].append(state["exp_avg_sq"])
                lists[4].append(self.lowp_outs.get(id(p)))
            beta1, beta2 = group["betas"]
            for step, (ps, gs, ms, vs, outs) in by_step.items():
                adam_step_multi(ps, gs, ms, vs, step=step, lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                                eps=group["eps"], weight_decay=group["weight_decay"],
                                adamw_mode=self.adam_w_mode, bias_correction=group["bias_correction"],
                                lowp_outs=outs)
        return loss


class CPUAdam(AdamBase):
    """Adam/AdamW for parameters in CPU memory (DeepSpeed's ``DeepSpeedCPUAdam``, same arguments).

    Args:
        model_params: tensors or param-group dicts, as any torch optimizer takes.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        bias_correction: apply Adam's bias correction (default True).
        amsgrad: not supported; ``True`` raises ``ValueError``.
        adamw_mode: ``True`` (default) for decoupled weight decay (AdamW), ``False`` for L2 (Adam).
        fp32_optimizer_states: keep ``exp_avg``/``exp_avg_sq`` in fp32 whatever the param dtype.

    State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq``. Grads may be fp32, bf16 or
    fp16. All parameters must live on the CPU (use ``offload_optimizer: {"device": "cpu"}`` in the
    ZeRO config to put the fp32 master weights there).
    """

    def __init__(
        self,
        model_params: Iterable,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        adamw_mode: bool = True,
        fp32_optimizer_states: bool = True,
    ) -> None:
        super().__init__(model_params, lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad, adamw_mode=adamw_mode)
        self.fp32_optimizer_states = bool(fp32_optimizer_states)

    def _check_param(self, p: torch.Tensor) -> None:
        if not p.is_cpu:
            raise RuntimeError(
                f"{type(self).__name__} got a parameter on {p.device}; it updates CPU tensors only. "
                "Enable 'offload_optimizer': {'device': 'cpu'} in the ZeRO config, or use FusedAdam/AdamW."
            )


DeepSpeedCPUAdam = CPUAdam
