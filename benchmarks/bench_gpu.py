"""Single-GPU benchmark: a ~1.1B-parameter LLaMA (``shardwise.models.Llama`` in TinyLlama-1.1B's shape), bf16,
sequence 2048, one process per mode (``benchmarks/gpu_check.sh`` runs each under its own time limit).

    python benchmarks/bench_gpu.py --mode plain --out /tmp/parts/plain.json     # one mode
    python benchmarks/bench_gpu.py --collect /tmp/parts --out results.json      # merge, print a table
    python benchmarks/bench_gpu.py --mode zero3 --device cpu --tiny --out x.json # the code path, on a CPU

Training modes (the same model, seed and batches; batch 4 x 2048 tokens; 3 warm-up steps, 10 timed):

* ``plain``: plain PyTorch, the baseline: fp32 weights, ``torch.autocast(bfloat16)``, fused AdamW, clipping 1.0;
* ``zero0`` / ``zero3``: ``shardwise.initialize`` with ``bf16``, ZeRO stage 0 / 3, world 1 (nccl). At world 1
  nothing is sharded, so the difference to ``plain`` is the engine's overhead (ZeRO-3: its gather/release
  machinery on a group of one);
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` per block and at the root, ``MixedPrecisionPolicy(bf16
  parameters, fp32 reduction)``, fused AdamW, world 1.

Reported per training mode: tokens/s (from the median step time), achieved TFLOP/s counting model FLOPs
(``6 N + 12 L d s`` per token: N the parameters outside the embedding table, L layers, d width, s sequence; the
attention term as in PaLM's appendix B, without discounting the causal mask), MFU against the card's dense bf16
peak (``--peak-tflops`` overrides the table below), peak memory and the first/last loss (every mode should train
alike). Inference (``infer``): ``shardwise.init_inference(dtype=bf16)`` forward tokens/s with and without
``enable_cuda_graph`` at three shapes (a one-token step, a 128-token prompt, 4 x 2048), and the largest
difference between graph and eager logits.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from anywhere without installing the package
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TRAIN_MODES = ("plain", "zero0", "zero3", "fsdp2")
MODES = (*TRAIN_MODES, "infer")
FULL = dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_hidden=5632, max_seq_len=2048)
TINY = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64)
INFER_SHAPES = {"full": [(1, 1), (1, 128), (4, 2048)], "tiny": [(1, 1), (1, 16), (2, 64)]}
# dense bf16 tensor-core peak, TFLOP/s (NVIDIA data sheets); matched against the device name, first hit wins
PEAK_TFLOPS = (("H200", 989.4), ("GH200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.4),
               ("A100", 312.0), ("L40S", 362.1))


# -- setup ------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(device: str, distributed: bool) -> None:
    """Choose the accelerator; start a one-rank process group (nccl on cuda, gloo on cpu) when asked."""
    os.environ["SHARDWISE_ACCELERATOR"] = device
    if not distributed:
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ[key] = value
    from shardwise import comm

    comm.init_distributed(verbose=False, timeout=120)


def _model_config(tiny: bool, seq: int) -> Any:
    from shardwise.models import LlamaConfig

    return LlamaConfig(**{**(TINY if tiny else FULL), "max_seq_len": seq})


def _build(cfg: Any, device: torch.device) -> torch.nn.Module:
    """The model in fp32, initialised directly on ``device`` (same seed for every mode)."""
    from shardwise.models import Llama

    torch.manual_seed(0)
    with torch.device(device):
        return Llama(cfg)


def _batches(cfg: Any, batch: int, seq: int, device: torch.device, n: int = 4) -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        t = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        out.append((t[:, :-1].to(device), t[:, 1:].to(device)))
    return out


def flops_per_token(cfg: Any, seq: int, params: int) -> float:
    """Model FLOPs of one trained token (forward + backward): ``6 N + 12 L d s`` with N = params - embedding."""
    matmul_params = params - cfg.vocab_size * cfg.dim
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.dim * seq


def peak_tflops(name: str, override: float | None) -> float | None:
    """The card's dense bf16 peak, or None when unknown (MFU is then not reported)."""
    if override:
        return override
    return next((v for key, v in PEAK_TFLOPS if key in name), None)


def _sync() -> None:
    from shardwise.accelerator import get_accelerator

    get_accelerator().synchronize()


def _device_info(device: str) -> dict:
    from shardwise.accelerator import get_accelerator

    acc = get_accelerator()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "total_memory_gib": acc.total_memory() / 2**30}


# -- training modes ----------------------------------------------------------------------------------------------------
def _plain(cfg: Any, device: torch.device) -> tuple[Callable, torch.nn.Module]:
    model = _build(cfg, device)
    opt = _adamw(model.parameters())

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model


def _adamw(params: Any) -> torch.optim.Optimizer:
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for these tensors (device or DTensor support)
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)


def _shardwise(cfg: Any, device: torch.device, stage: int, batch: int) -> tuple[Callable, torch.nn.Module]:
    import shardwise

    config = {"train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
              "zero_optimization": {"stage": stage}}
    engine, _, _, _ = shardwise.initialize(model=_build(cfg, device), config=config)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step, engine.module


def _fsdp2(cfg: Any, device: torch.device) -> tuple[Callable, torch.nn.Module]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = _build(cfg, device)
    mesh = init_device_mesh(device.type, (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = _adamw(model.parameters())

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train(args: argparse.Namespace) -> dict:
    """Build one training mode, run warm-up and timed steps, return its measurements."""
    from shardwise.accelerator import get_accelerator

    device = torch.device(args.device)
    _setup(args.device, distributed=args.mode != "plain")
    cfg = _model_config(args.tiny, args.seq)
    builders = {"plain": lambda: _plain(cfg, device), "zero0": lambda: _shardwise(cfg, device, 0, args.batch),
                "zero3": lambda: _shardwise(cfg, device, 3, args.batch), "fsdp2": lambda: _fsdp2(cfg, device)}
    acc = get_accelerator()
    start = time.perf_counter()
    step, model = builders[args.mode]()
    params = _count_params(_build(cfg, torch.device("meta")))  # the full count (ZeRO-3 modules hold placeholders)
    build_s = time.perf_counter() - start
    data = _batches(cfg, args.batch, args.seq, device)
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        _sync()
        t0 = time.perf_counter()
        losses.append(step(*data[i % len(data)]))
        _sync()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    step_s = statistics.median(timed)
    tokens_s = args.batch * args.seq / step_s
    achieved = flops_per_token(cfg, args.seq, params) * tokens_s / 1e12
    peak = peak_tflops(_device_info(args.device)["device"], args.peak_tflops) if args.device == "cuda" else None
    return {"params": params, "batch": args.batch, "seq": args.seq, "build_s": round(build_s, 2),
            "first_step_s": round(times[0], 3), "step_ms": round(step_s * 1e3, 2),
            "step_ms_spread": [round(min(timed) * 1e3, 2), round(max(timed) * 1e3, 2)],
            "tokens_per_s": round(tokens_s, 1), "tflops": round(achieved, 2),
            "mfu": round(achieved / peak, 4) if peak else None, "peak_tflops": peak,
            "peak_memory_gib": round(acc.max_memory_allocated() / 2**30, 2),
            "loss_first": round(losses[0].item(), 4), "loss_last": round(losses[-1].item(), 4)}


# -- inference ---------------------------------------------------------------------------------------------------------
def _time_calls(fn: Callable[[], Any], min_iters: int = 3, max_iters: int = 200, budget_s: float = 1.0) -> float:
    """Median seconds per call, each call synchronised, until ``budget_s`` is spent (at least ``min_iters``)."""
    times: list[float] = []
    spent = 0.0
    while len(times) < min_iters or (spent < budget_s and len(times) < max_iters):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
        spent += times[-1]
    return statistics.median(times)


def _logits_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@torch.no_grad()
def _measure_shape(eager: Any, graphed: Any, ids: torch.Tensor, device: str) -> dict:
    """Eager and (where the accelerator captures graphs) replayed forward time of one input shape."""
    batch, seq = ids.shape
    row: dict[str, Any] = {"batch": batch, "seq": seq}
    for _ in range(3):
        reference = eager(ids)
    s = _time_calls(lambda: eager(ids))
    row.update(eager_ms=round(s * 1e3, 3), eager_tokens_per_s=round(batch * seq / s, 1))
    if graphed is None:
        row["graph"] = f"skipped: the {device} accelerator has no graph capture"
        return row
    gap = _logits_gap(graphed(ids), reference)  # the first call captures
    s = _time_calls(lambda: graphed(ids))
    row.update(graph_ms=round(s * 1e3, 3), graph_tokens_per_s=round(batch * seq / s, 1),
               graph_speedup=round(row["eager_ms"] / (s * 1e3), 2), graph_vs_eager_logits=gap)
    return row


def infer(args: argparse.Namespace) -> dict:
    """Forward tokens/s of ``init_inference`` at a few shapes, eagerly and replaying CUDA graphs."""
    import shardwise
    from shardwise.accelerator import get_accelerator

    _setup(args.device, distributed=False)
    cfg = _model_config(args.tiny, args.seq)
    model = _build(cfg, torch.device(args.device)).eval()
    eager = shardwise.init_inference(model, dtype=torch.bfloat16)
    graphs = get_accelerator().supports_graph_capture()
    graphed = shardwise.init_inference(model, dtype=torch.bfloat16, enable_cuda_graph=True) if graphs else None
    g = torch.Generator().manual_seed(2)
    rows = []
    for batch, seq in INFER_SHAPES["tiny" if args.tiny else "full"]:
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(eager.device)
        rows.append(_measure_shape(eager, graphed, ids, args.device))
    return {"params": _count_params(model), "dtype": "bf16", "shapes": rows,
            "peak_memory_gib": round(get_accelerator().max_memory_allocated() / 2**30, 2)}


# -- collect -----------------------------------------------------------------------------------------------------------
def _tests_summary(junit: Path) -> dict:
    """Counts and failing test names from pytest's JUnit XML (our own file, written by this run)."""
    if not junit.is_file():
        return {"status": "no report"}
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "time_s": float(suite.get("time", 0.0)), "failed": failed}


def _steps_summary(steps: Path) -> list[dict]:
    """The shell driver's per-step lines: name, exit status, seconds, limit."""
    if not steps.is_file():
        return []
    out = []
    for line in steps.read_text().splitlines():
        name, rc, seconds, limit = (line.split("\t") + ["", "", "", ""])[:4]
        out.append({"step": name, "rc": rc, "seconds": seconds, "limit_s": limit,
                    "status": {"0": "ok", "124": "timed out", "137": "killed", "skip": "skipped"}.get(rc, "failed")})
    return out


def _table(modes: dict) -> str:
    base = modes.get("plain", {}).get("tokens_per_s")
    lines = ["| mode | tokens/s | x plain | TFLOP/s | MFU | step ms | peak GiB | loss first -> last |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name in TRAIN_MODES:
        r = modes.get(name)
        if not r or r.get("status") != "ok":
            lines.append(f"| {name} | {r.get('status', 'missing') if r else 'missing'} | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {ratio} | {r['tflops']:.1f} | {mfu} | {r['step_ms']:.1f} "
                     f"| {r['peak_memory_gib']:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} |")
    inf = modes.get("infer")
    if inf and inf.get("status") == "ok":
        lines += ["", "| inference batch x seq | eager tokens/s | CUDA graph tokens/s | speed-up | logits gap |",
                  "|---|---:|---:|---:|---:|"]
        for s in inf["shapes"]:
            gap = s.get("graph_vs_eager_logits")
            lines.append(f"| {s['batch']} x {s['seq']} | {s['eager_tokens_per_s']:,.0f} | "
                         f"{s.get('graph_tokens_per_s', 'n/a')} | {s.get('graph_speedup', 'n/a')} | "
                         f"{'n/a' if gap is None else f'{gap:.1e}'} |")
    return "\n".join(lines)


def collect(parts: Path, out: Path, steps: Path | None, junit: Path | None) -> dict:
    """Merge every mode's JSON in ``parts`` (plus the driver's step log and the test report) into ``out``."""
    modes = {}
    for path in sorted(parts.glob("*.json")):
        data = json.loads(path.read_text())
        modes[data.get("mode", path.stem)] = data
    info = next((m.get("info") for m in modes.values() if m.get("info")), {})
    result = {"info": info, "modes": modes, "table": _table(modes),
              "steps": _steps_summary(steps) if steps else [], "tests": _tests_summary(junit) if junit else {}}
    out.write_text(json.dumps(result, indent=2, default=str))
    print(summary_markdown(result))
    return result


def summary_markdown(result: dict) -> str:
    """The whole run as markdown: the card, the test counts and failures, every step's status, the tables."""
    info, tests = result["info"], result["tests"]
    lines = [f"# GPU check: {info.get('device', 'unknown device')} (torch {info.get('torch')}, "
             f"CUDA {info.get('cuda')})", ""]
    if "tests" in tests:
        lines.append(f"tests/gpu: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped in {tests['time_s']:.0f} s")
        lines += [f"- FAILED {name}" for name in tests["failed"]]
    else:
        lines.append(f"tests/gpu: {tests.get('status', 'not run')}")
    lines += ["", "| step | status | seconds | limit |", "|---|---|---:|---:|"]
    lines += [f"| {s['step']} | {s['status']} ({s['rc']}) | {s['seconds']} | {s['limit_s']} |" for s in result["steps"]]
    errors = [f"- {name}: {m['error'].strip().splitlines()[-1]}" for name, m in result["modes"].items()
              if m.get("status") == "error"]
    lines += ["", result["table"]] + (["", "benchmark errors:"] + errors if errors else [])
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=MODES)
    ap.add_argument("--collect", type=Path, help="merge the per-mode JSON files of this folder into --out")
    ap.add_argument("--steps-log", type=Path, help="with --collect: the driver's tab-separated step log")
    ap.add_argument("--junit", type=Path, help="with --collect: pytest's JUnit XML report of tests/gpu")
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (with --device cpu: a check of the script)")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default 4; tiny 2)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; tiny 64)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, for MFU")
    args = ap.parse_args(argv)
    if (args.mode is None) == (args.collect is None):
        ap.error("give exactly one of --mode or --collect")
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (TINY["max_seq_len"] if args.tiny else FULL["max_seq_len"])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.collect:
        collect(args.collect, args.out, args.steps_log, args.junit)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --tiny to check the script", file=sys.stderr)
        return 2
    record: dict[str, Any] = {"mode": args.mode, "tiny": args.tiny}
    try:
        measured = infer(args) if args.mode == "infer" else train(args)
        record.update(status="ok", info=_device_info(args.device), **measured)
        code = 0
    except Exception:
        record.update(status="error", error=traceback.format_exc()[-4000:])
        code = 1
    finally:
        from shardwise import comm

        comm.destroy_process_group()  # no-op when none was started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({k: v for k, v in record.items() if k != "error"}, default=str))
    if code:
        print(record["error"], file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
