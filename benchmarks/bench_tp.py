"""Tensor-parallel benchmarks on the LLaMA reference model: shardwise TP=2 against torch's ``parallelize_module``
(ColwiseParallel / RowwiseParallel) in the same run, and activation memory with and without
``partition_activations`` and ``cpu_checkpointing``.

Run:  python benchmarks/bench_tp.py            (from the repository root; a few minutes on 2 cores)
      python benchmarks/bench_tp.py --quick    (small model, fewer steps: checks the benchmark works)

Throughput and memory (2 gloo ranks, one thread each): the same ``Llama`` (same seed, same weights) is made
tensor-parallel twice on every rank: ``Llama(cfg, Topology(tp=2))`` (shardwise: fused Q|K|V and gate|up
column-parallel projections, row-parallel outputs, vocabulary-parallel embedding, LM head and cross-entropy), and
the plain model passed to ``torch.distributed.tensor.parallel.parallelize_module`` with the torchtitan-style plan
(``ColwiseParallel`` on the fused projections, whose rows are first reordered rank-major so that torch's contiguous
sharding gives each rank whole heads, ``RowwiseParallel`` on the outputs and the embedding, a sharded LM head under
``loss_parallel``). Both losses are checked against the plain model before timing. Steps (forward, backward, SGD
step) alternate between the two implementations round by round; reported: best-of-N step time, tokens/s, local
parameter bytes, and the peak resident-set growth during a step (CPU memory is the process's RSS).

Activation memory (2 ranks, TP=2, ``checkpoint_activations`` around every block): RSS growth over the forward pass
(what the graph holds until the backward) and the exact bytes of checkpoint inputs held (``memory_stats()``), for
no checkpointing, checkpointing, ``partition_activations``, ``cpu_checkpointing`` and both. On this CPU-only machine
the accelerator *is* host memory, so ``cpu_checkpointing`` cannot lower it here: the row shows the mechanism
(inputs copied to host) costs nothing; its saving appears on GPUs/HPUs. Writes ``benchmarks/results/tp.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "tp.md"
SIZES = {
    "quick": dict(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=256),
    "full": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512),
}
ACT_SIZES = {
    "quick": dict(vocab_size=1024, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=512),
    "full": dict(vocab_size=1024, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=1024),
}
BATCH = 4


def _rss() -> int:
    from shardwise.accelerator import get_accelerator

    return get_accelerator().memory_allocated()


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back so RSS deltas mean something
    except OSError:
        pass


def _batch(cfg, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _torch_tp(plain, cfg, mesh):
    """Plain Llama -> torch DTensor tensor parallelism (fused rows reordered so each rank gets whole heads)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from shardwise.tp.partition import DimSplit

    hd, h, kv, f = cfg.head_dim, cfg.n_heads, cfg.kv_heads, cfg.hidden
    splits = {"attn.wqkv": DimSplit.of((h + 2 * kv) * hd, 2, hd, parts=(h * hd, kv * hd, kv * hd)),
              "ffn.w13": DimSplit.of(2 * f, 2, parts=(f, f))}
    with torch.no_grad():
        for block in plain.layers:
            for path, split in splits.items():
                lin = block.get_submodule(path)
                order = [i for r in range(2) for lo, hi in split.ranges(r) for i in range(lo, hi)]
                lin.weight.copy_(lin.weight[torch.tensor(order)])
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate()),
        "layers.*.attn.wqkv": ColwiseParallel(),
        "layers.*.attn.wo": RowwiseParallel(),
        "layers.*.ffn.w13": ColwiseParallel(),
        "layers.*.ffn.w2": RowwiseParallel(),
        "output": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }
    return parallelize_module(plain, mesh, plan)


def _local_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def throughput_rank(size: dict, seq: int, steps: int) -> dict:
    """Time shardwise TP=2 and torch TP=2 on the same model, alternating; check their losses first."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from shardwise import comm
    from shardwise.accelerator import get_accelerator
    from shardwise.comm.topology import Topology
    from shardwise.models import Llama, LlamaConfig

    cfg = LlamaConfig(**size)
    torch.manual_seed(0)
    ours = Llama(cfg, Topology(tp=2))
    torch.manual_seed(0)
    plain = Llama(cfg)
    x, y = _batch(cfg, seq)
    with torch.no_grad():
        ref_loss = plain(x, y).item()
    theirs = _torch_tp(plain, cfg, init_device_mesh("cpu", (2,)))
    models = {"shardwise": ours, "torch parallelize_module": theirs}
    contexts = {"shardwise": None, "torch parallelize_module": loss_parallel}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4) for k, m in models.items()}
    out = {k: {"times": [], "peak": [], "params": _local_bytes(m), "loss_error": None} for k, m in models.items()}
    acc = get_accelerator()
    for step in range(steps + 1):  # step 0: warm-up and loss check
        names = list(models) if step % 2 == 0 else list(reversed(models))
        for name in names:
            model, ctx = models[name], contexts[name]
            _trim()
            comm.barrier()
            base = _rss()
            acc.reset_peak_memory_stats()
            start = time.perf_counter()
            with ctx() if ctx else _null():
                loss = model(x, y)
                loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            peak = acc.max_memory_allocated() - base
            if step == 0:
                value = loss.full_tensor().item() if hasattr(loss, "full_tensor") else loss.item()
                out[name]["loss_error"] = abs(value - ref_loss) / abs(ref_loss)
            else:
                out[name]["times"].append(elapsed)
                out[name]["peak"].append(peak)
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


MODES = {
    "no checkpointing": None,
    "checkpointing": {},
    "+ partition_activations": {"partition_activations": True},
    "+ cpu_checkpointing": {"checkpoint_in_cpu": True},
    "+ partition + cpu": {"partition_activations": True, "checkpoint_in_cpu": True},
}


def activation_rank(size: dict, seq: int, mode: str) -> dict:
    """RSS growth over one forward and the checkpoint inputs held, for one checkpointing mode."""
    from dataclasses import replace

    import shardwise
    from shardwise.comm.topology import Topology
    from shardwise.models import Llama, LlamaConfig
    from shardwise.tp import ModelParallelUnit

    options = MODES[mode]
    topo = Topology(tp=2)
    cfg = replace(LlamaConfig(**size), checkpoint_activations=options is not None)
    if options is not None:
        shardwise.checkpointing.configure(ModelParallelUnit(topo), **options)
    torch.manual_seed(0)
    model = Llama(cfg, topo).train()
    x, y = _batch(cfg, seq)
    model(x, y).backward()  # warm-up: allocator and autograd caches
    model.zero_grad(set_to_none=False)
    _trim()
    base = _rss()
    loss = model(x, y)
    _trim()  # drop the forward's freed temporaries, keep what the graph holds
    grown = _rss() - base
    held = shardwise.checkpointing.memory_stats()
    loss.backward()
    return {"forward_rss": grown, "checkpoint_bytes": sum(held.values())}


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main(argv: list[str] | None = None) -> str:
    from tests.dist import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model and few steps (checks the benchmark works)")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    kind = "quick" if args.quick else "full"
    steps = 3 if args.quick else 8
    this = sys.modules[__name__].__spec__.name if __spec__ else "benchmarks.bench_tp"
    mod = __import__(this, fromlist=["throughput_rank"])
    size, seq = SIZES[kind], SIZES[kind]["max_seq_len"]
    res = run_ranks(mod.throughput_rank, size, seq, steps, world_size=2, timeout=1200)
    tokens = BATCH * seq
    lines = [f"Tensor parallelism, TP=2 on 2 gloo ranks (CPU, torch {torch.__version__}, one thread per rank). "
             f"Model: Llama {size}, batch {BATCH} x {seq} tokens, fp32, SGD. Best of {steps} steps per "
             "implementation, alternating.", "",
             "| implementation | loss vs plain model (rel.) | step ms (best) | tokens/s | params MB / rank "
             "| peak RSS growth MB / rank |", "|---|---:|---:|---:|---:|---:|"]
    for name in res[0]:
        best = min(max(r[name]["times"][i] for r in res) for i in range(steps))  # a step ends on the slower rank
        peak = max(max(r[name]["peak"]) for r in res)
        err = max(r[name]["loss_error"] for r in res)
        lines.append(f"| {name} | {err:.1e} | {best * 1e3:.1f} | {tokens / best:,.0f} | "
                     f"{_mb(res[0][name]['params'])} | {_mb(peak)} |")
    act_size, act_seq = ACT_SIZES[kind], ACT_SIZES[kind]["max_seq_len"]
    lines += ["", f"Activation memory per rank, TP=2, Llama {act_size}, batch {BATCH} x {act_seq}, checkpoint around "
              "every block. Forward RSS growth = memory the graph holds until the backward; checkpoint inputs = "
              "exact bytes saved by shardwise.checkpointing (rank 0).", "",
              "| mode | forward RSS growth MB | checkpoint inputs MB |", "|---|---:|---:|"]
    for mode in MODES:
        r = run_ranks(mod.activation_rank, act_size, act_seq, mode, world_size=2, timeout=1200)
        lines.append(f"| {mode} | {_mb(max(x['forward_rss'] for x in r))} | {_mb(r[0]['checkpoint_bytes'])} |")
    lines += ["", "On CPU the accelerator is host memory, so cpu_checkpointing moves nothing; on a GPU/HPU its "
              "checkpoint inputs leave device memory entirely. Timings on a shared machine are noisy: rerun before "
              "quoting."]
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
