"""One row of the training benchmark: train the GPT on every rank with one engine, write a JSON result (rank 0).

Started by ``bench_train.py`` (never by hand, though it works), once per row, under a launcher:

    shardwise --num_gpus 2 benchmarks/train_worker.py --engine shardwise --stage 2 ...       (our launcher)
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/train_worker.py --engine ddp ...
    .venv-deepspeed/bin/python -m torch.distributed.run ... --engine deepspeed ...             (DeepSpeed's venv)

This file imports only torch at module level, so it runs in the DeepSpeed venv (where shardwise is not installed):
the model is ``shardwise/models/gpt.py`` loaded by path, a plain-PyTorch file. Every engine trains the same model
(same seed), on the same batches, with the same optimizer (AdamW lr 1e-3, wd 0.01) and clipping (1.0), its other
settings left at their defaults.

Communication is counted the same way for every engine: the torch.distributed collectives are wrapped before any
engine is imported, and each call adds its buffer size (``msg``: the full buffer, e.g. the gathered tensor) and the
bytes this rank sends on a ring (``wire``: all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n, as in
shardwise's comms log). DDP's reducer issues its all-reduce from C++, so DDP gets torch's stock Python
``allreduce_hook`` (the same divide-then-all-reduce) as its comm hook, which calls the wrapped ``all_reduce``.
For shardwise the comms log's own totals are reported beside it as a cross-check.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.01, 1.0
DISTINCT_BATCHES = 8  # batches repeat, so the loss curve falls and engines can be compared on it


# -- communication counting -------------------------------------------------------------------------------------
class CommCounter:
    """Wraps torch.distributed collectives; counts bytes of the outermost call only (aliases call each other)."""

    _WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
             "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
             "broadcast": lambda n: 1.0, "reduce": lambda n: (n - 1) / n, "send": lambda n: 1.0}

    def __init__(self) -> None:
        self.msg = 0.0
        self.wire = 0.0
        self.calls = 0
        self.enabled = False
        self._tls = threading.local()

    def reset(self) -> None:
        self.msg = self.wire = 0.0
        self.calls = 0

    def install(self) -> None:
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        specs = {
            "all_reduce": ("all_reduce", lambda a, k: nbytes(_arg(a, k, 0, "tensor"))),
            "all_reduce_coalesced": ("all_reduce", lambda a, k: sum(nbytes(t) for t in _arg(a, k, 0, "tensors"))),
            "reduce_scatter_single": ("reduce_scatter", lambda a, k: nbytes(_arg(a, k, 1, "input"))),
            "reduce_scatter_tensor": ("reduce_scatter", lambda a, k: nbytes(_arg(a, k, 1, "input"))),
            "_reduce_scatter_base": ("reduce_scatter", lambda a, k: nbytes(_arg(a, k, 1, "input"))),
            "reduce_scatter": ("reduce_scatter", lambda a, k: sum(nbytes(t) for t in _arg(a, k, 1, "input_list"))),
            "all_gather_single": ("all_gather", lambda a, k: nbytes(_arg(a, k, 0, "output_tensor"))),
            "all_gather_into_tensor": ("all_gather", lambda a, k: nbytes(_arg(a, k, 0, "output_tensor"))),
            "_all_gather_base": ("all_gather", lambda a, k: nbytes(_arg(a, k, 0, "output_tensor"))),
            "all_gather": ("all_gather", lambda a, k: sum(nbytes(t) for t in _arg(a, k, 0, "tensor_list"))),
            "broadcast": ("broadcast", lambda a, k: nbytes(_arg(a, k, 0, "tensor"))),
            "reduce": ("reduce", lambda a, k: nbytes(_arg(a, k, 0, "tensor"))),
            "all_to_all_single": ("all_to_all", lambda a, k: nbytes(_arg(a, k, 1, "input"))),
            "send": ("send", lambda a, k: nbytes(_arg(a, k, 0, "tensor"))),
            "isend": ("send", lambda a, k: nbytes(_arg(a, k, 0, "tensor"))),
        }
        for name, (op, size) in specs.items():
            for mod in (dist, dist.distributed_c10d):
                original = getattr(mod, name, None)
                if original is not None and not getattr(original, "_bench_counted", False):
                    setattr(mod, name, self._wrap(original, op, size))

    def _wrap(self, original, op, size):
        counter = self

        def wrapper(*args, **kwargs):
            depth = getattr(counter._tls, "depth", 0)
            if depth == 0 and counter.enabled:
                try:
                    group = kwargs.get("group")
                    n = dist.get_world_size(group) if group is not None else dist.get_world_size()
                    b = float(size(args, kwargs))
                    counter.msg += b
                    counter.wire += counter._WIRE.get(op, lambda n: 1.0)(n) * b if n > 1 else 0.0
                    counter.calls += 1
                except Exception:  # never let counting break a collective
                    pass
            counter._tls.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._tls.depth = depth

        wrapper._bench_counted = True
        return wrapper


def _arg(args, kwargs, index, name):
    return kwargs[name] if name in kwargs else args[index]


COUNTER = CommCounter()


# -- model and data ---------------------------------------------------------------------------------------------
def load_gpt_module():
    """``shardwise/models/gpt.py`` by path: the same model code in every venv, without importing shardwise."""
    spec = importlib.util.spec_from_file_location("bench_gpt", ROOT / "shardwise" / "models" / "gpt.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def make_batch(step: int, rank: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + 7919 * (step % DISTINCT_BATCHES) + rank)
    tokens = torch.randint(0, args.vocab, (args.micro, args.block + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def ds_style_config(args) -> dict:
    """The one config both shardwise and DeepSpeed rows use (it is a plain DeepSpeed config)."""
    cfg = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
           "gradient_clipping": CLIP, "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
           "zero_optimization": {"stage": args.stage}}
    if args.offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if args.stage == 3:
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    if args.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if args.tuned:  # what HF Trainer writes for "auto" (hidden size h), with communication overlapped
        h = args.n_embd
        cfg["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=h * h)
        if args.stage == 3:
            cfg["zero_optimization"].update(stage3_prefetch_bucket_size=int(0.9 * h * h),
                                            stage3_param_persistence_threshold=10 * h)
    return cfg


# -- engines: each returns (train_step(step) -> local loss, extras() -> dict) -------------------------------------
def build_ddp(model, args):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, default_hooks.allreduce_hook)  # routes the bucket all-reduce through Python
    opt = torch.optim.AdamW(ddp.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    def train_step(step: int) -> float:
        x, y = make_batch(step, dist.get_rank(), args)
        loss = ddp(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return train_step, dict


def build_fsdp2(model, args, reshard: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if args.precision == "bf16" else MixedPrecisionPolicy()
    for block in (model.blocks if hasattr(model, "blocks") else model.layers):  # GPT | LLaMA
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def train_step(step: int) -> float:
        x, y = make_batch(step, dist.get_rank(), args)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return train_step, dict


def build_shardwise(model, args):
    sys.path.insert(0, str(ROOT))  # the checkout's shardwise, whatever the working directory
    import shardwise
    from shardwise.comm import COMMS_LOG

    engine, _, _, _ = shardwise.initialize(model=model, config=ds_style_config(args))

    def train_step(step: int) -> float:
        loss = engine(*make_batch(step, dist.get_rank(), args))
        engine.backward(loss)
        engine.step()
        return loss.item()

    def extras() -> dict:
        t = COMMS_LOG.totals()
        return {"comms_log_msg": t.msg_bytes, "comms_log_wire": t.wire_bytes, "engine_desc": repr(engine),
                "model_states": engine.memory_breakdown()}

    return train_step, extras, COMMS_LOG.reset


def build_deepspeed(model, args):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=ds_style_config(args))

    def train_step(step: int) -> float:
        loss = engine(*make_batch(step, dist.get_rank(), args))
        engine.backward(loss)
        engine.step()
        return loss.item()

    return train_step, lambda: {"engine_desc": f"DeepSpeed {deepspeed.__version__}: {type(optimizer).__name__}"}


# -- the run ------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, choices=["ddp", "fsdp2", "fsdp2-full", "shardwise", "deepspeed"])
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--tuned", action="store_true", help="HF's 'auto' bucket sizes and overlap_comm (DeepSpeed rows)")
    ap.add_argument("--model", choices=["gpt", "llama"], default="gpt",
                    help="llama: shardwise/models/llama.py (n_layer/n_embd/n_head = layers/dim/heads)")
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the shardwise/deepspeed launchers")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    COUNTER.install()  # before any engine is imported, so every engine's collectives go through the wrappers
    if not dist.is_initialized() and args.engine != "deepspeed":
        dist.init_process_group("gloo")
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # torch + process group, no model yet
    torch.manual_seed(0)
    if args.model == "llama":  # the reference LLaMA imports shardwise.tp for its layers (plain nn.Linear at tp=1)
        sys.path.insert(0, str(ROOT))
        from shardwise.models.llama import Llama, LlamaConfig

        model = Llama(LlamaConfig(vocab_size=args.vocab, dim=args.n_embd, n_layers=args.n_layer,
                                  n_heads=args.n_head, max_seq_len=args.block))
    else:
        gpt = load_gpt_module()
        model = gpt.GPT(gpt.GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=args.n_layer,
                                      n_head=args.n_head, n_embd=args.n_embd))
    n_params = model.num_parameters()
    reset_extra = None
    if args.engine == "ddp":
        train_step, extras = build_ddp(model, args)
    elif args.engine.startswith("fsdp2"):
        train_step, extras = build_fsdp2(model, args, reshard=args.engine == "fsdp2-full")
    elif args.engine == "shardwise":
        train_step, extras, reset_extra = build_shardwise(model, args)
    else:
        train_step, extras = build_deepspeed(model, args)
    rank = dist.get_rank()
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # count communication over the measured steps only
            COUNTER.reset()
            COUNTER.enabled = True
            if reset_extra is not None:
                reset_extra()
        start = time.perf_counter()
        losses.append(train_step(step))
        times.append(time.perf_counter() - start)
    COUNTER.enabled = False
    comm_msg, comm_wire, comm_calls = COUNTER.msg, COUNTER.wire, COUNTER.calls
    extra = extras()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {"losses": losses, "times": times, "rss": peak_rss, "rss_start": rss_start})
    if rank == 0:
        measured = [max(r["times"][i] for r in everyone) for i in range(args.warmup, len(times))]
        curve = [sum(r["losses"][i] for r in everyone) / len(everyone) for i in range(len(losses))]
        result = {
            "engine": args.engine, "stage": args.stage, "precision": args.precision, "offload": args.offload,
            "params": n_params, "median_step_s": statistics.median(measured), "min_step_s": min(measured),
            "step_times_s": measured, "peak_rss_bytes": [r["rss"] for r in everyone], "loss_curve": curve,
            "start_rss_bytes": [r["rss_start"] for r in everyone],
            "comm_msg_bytes_per_step": comm_msg / args.steps, "comm_wire_bytes_per_step": comm_wire / args.steps,
            "comm_calls_per_step": comm_calls / args.steps, "world_size": dist.get_world_size(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
        }
        for key, value in extra.items():
            result[key] = value / args.steps if key.startswith("comms_log") else value
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.barrier()
    if args.engine != "deepspeed":
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
