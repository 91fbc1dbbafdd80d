"""Inference benchmark: shardwise init_inference (TP=1, TP=2) vs Hugging Face eager vs DeepSpeed init_inference.

    .venv/bin/python benchmarks/bench_inference.py --quick          # tiny LLaMA only, ~2 minutes
    .venv/bin/python benchmarks/bench_inference.py                  # + a 155M-parameter LLaMA for TP scaling

For each model, dtype and framework it launches fresh processes (one per rank; a single process runs with 1 and
with all cores' threads, TP=2 ranks with cores/2 each) and measures, at batch 1 and 8 with a 32-token prompt:

* load time: from files on disk to a ready model (HF ``from_pretrained``; shardwise ``init_inference`` building
  on the meta device and reading each rank's slices; DeepSpeed ``from_pretrained`` on every rank, then
  ``init_inference`` with auto-TP, its documented path without kernel injection);
* TTFT and per-token latency from a timestamping streamer passed to ``generate(N)``: time to the first new token,
  and the median interval between later tokens (over all repeats); tokens/s: batch * N / ``generate(N)`` (median);
  ranks aligned by a barrier before each call;
* peak RSS of each rank (VmHWM), largest over ranks;
* a fingerprint of the greedy tokens (rows of one model and dtype should agree; fp32 TP splits change rounding
  only).

DeepSpeed rows run in benchmarks/.venv-deepspeed (``benchmarks/setup_deepspeed_env.sh``) with that venv's python
in a subprocess; shardwise never imports DeepSpeed. transformers is taken from the main venv (appended to the
path after the DeepSpeed venv's own packages; both venvs have the same torch). Results (markdown) go to
benchmarks/results/inference.md and, as JSON lines, to benchmarks/out/inference.jsonl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
DS_PYTHON = HERE / ".venv-deepspeed" / "bin" / "python"
MAIN_SITE = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"), None)

MODELS = {
    # a tiny LLaMA: per-token cost is dominated by framework overhead and communication latency
    "llama-tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096),
    # 155M parameters: compute dominates, so TP=2 should decode faster than TP=1
    "llama-155m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=32000),
}
PROMPT = 32


# -- the worker (one process per rank) ----------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Clock:
    """A generate() streamer that only timestamps: ``put`` is called with the prompt, then once per new token."""

    def __init__(self) -> None:
        self.start, self.stamps, self._prompt_seen = 0.0, [], False

    def put(self, value) -> None:
        if self._prompt_seen:
            self.stamps.append(time.perf_counter() - self.start)
        self._prompt_seen = True

    def end(self) -> None:
        return None


def _load(framework: str, path: str, dtype, tp: int):
    if framework == "hf":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if framework == "shardwise":
        import shardwise

        return shardwise.init_inference(checkpoint=path, tensor_parallel={"tp_size": tp}, dtype=dtype)
    import deepspeed  # only ever imported inside the DeepSpeed venv's worker process
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=dtype,
                                    replace_with_kernel_inject=False)


def worker(spec: dict) -> None:
    if spec["framework"] == "deepspeed" and MAIN_SITE is not None:
        sys.path.append(str(MAIN_SITE))  # transformers from the main venv, after DeepSpeed's own packages
    import torch
    import torch.distributed as dist

    torch.set_num_threads(spec["threads"])
    tp = spec["tp"]
    if tp > 1:
        dist.init_process_group("gloo")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    barrier = dist.barrier if tp > 1 else (lambda: None)
    barrier()
    start = time.perf_counter()
    model = _load(spec["framework"], spec["path"], dtype, tp)
    load_s = time.perf_counter() - start
    rows = []
    for batch in spec["batches"]:
        ids = torch.randint(3, 1000, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(ids)

        def run(new: int, ids=ids, mask=mask) -> tuple[float, list[float], torch.Tensor]:
            """(total seconds, time of each new token since the call, tokens) of one generate()."""
            clock = _Clock()
            barrier()
            clock.start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0, streamer=clock)
            return time.perf_counter() - clock.start, clock.stamps, out

        run(4)  # warm-up
        runs = [run(spec["new_tokens"]) for _ in range(spec["repeats"])]
        steps = [b - a for _, stamps, _ in runs for a, b in zip(stamps, stamps[1:])]
        total = statistics.median(t for t, _, _ in runs)
        tokens = runs[0][2][0, PROMPT:].tolist()
        rows.append({"batch": batch, "ttft_ms": statistics.median(stamps[0] for _, stamps, _ in runs) * 1e3,
                     "per_token_ms": statistics.median(steps) * 1e3,
                     "tokens_per_s": batch * spec["new_tokens"] / total,
                     "fingerprint": hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:8]})
    rss = [_peak_rss_mb()]
    if tp > 1:
        gathered = [None] * tp
        dist.all_gather_object(gathered, rss[0])
        rss = gathered
    if int(os.environ.get("RANK", "0")) == 0:
        for row in rows:
            print("RESULT " + json.dumps({**{k: spec[k] for k in ("model", "dtype", "framework", "tp", "threads")},
                                          **row, "load_s": load_s, "peak_rss_mb": max(rss), "rss_mb": rss}),
                  flush=True)
    if tp > 1:
        dist.barrier()
        dist.destroy_process_group()


# -- the driver ---------------------------------------------------------------------------------------------------
def ensure_model(name: str) -> Path:
    """config.json + one safetensors file of random weights (written directly: no model construction)."""
    path = OUT / "models" / name
    if (path / "model.safetensors").exists():
        return path
    import torch
    import transformers
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**MODELS[name], max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    config.save_pretrained(path)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g) * 0.02 + (1.0 if k.endswith("norm.weight") else 0.0)
               for k, s in shapes.items()}, str(path / "model.safetensors"))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, timeout: float) -> list[dict]:
    """Run ``spec`` on ``spec['tp']`` fresh processes; the RESULT lines of rank 0."""
    python = spec.get("python") or sys.executable
    tp, port = spec["tp"], _free_port()
    procs = []
    for rank in range(tp):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(tp),
               "LOCAL_WORLD_SIZE": str(tp), "LOCAL_SIZE": str(tp), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(spec["threads"]), "SHARDWISE_ACCELERATOR": "cpu",
               "DS_ACCELERATOR": "cpu", "TRANSFORMERS_VERBOSITY": "error", "SHARDWISE_LOG_LEVEL": "WARNING"}
        procs.append(subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results, errors = [], []
    for rank, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += f"\n(timed out after {timeout:.0f}s)"
        results += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        if p.returncode:
            errors.append(f"rank {rank} exit {p.returncode}: {err.strip().splitlines()[-3:]}")
    if errors:
        print(f"  FAILED {spec['framework']} tp={tp}: {errors}", flush=True)
    # DeepSpeed's shared-memory all-reduce leaves its buffers (~70 MB per rank, in RAM) in /dev/shm
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
        leftover.unlink(missing_ok=True)
    return results


def _table(rows: list[dict]) -> str:
    head = ("| model | dtype | framework | TP | threads/rank | batch | load s | TTFT ms | per-token ms | tokens/s "
            "| peak RSS/rank MB | tokens |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [f"| {r['model']} | {r['dtype']} | {r['framework']} | {r['tp']} | {r['threads']} | {r['batch']} | "
             f"{r['load_s']:.2f} | "
             f"{r['ttft_ms']:.1f} | {r['per_token_ms']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
             f"{r['fingerprint']} |" for r in rows]
    return "\n".join([head, *lines])


def _best(rows: list[dict], model: str, batch: int, framework: str) -> dict[int, dict]:
    """tp -> the fastest fp32 row (over thread counts) of ``framework``."""
    best: dict[int, dict] = {}
    for r in rows:
        if (r["model"], r["batch"], r["framework"], r["dtype"]) == (model, batch, framework, "fp32"):
            if r["tp"] not in best or r["per_token_ms"] < best[r["tp"]]["per_token_ms"]:
                best[r["tp"]] = r
    return best


def _scaling(rows: list[dict]) -> list[str]:
    out = []
    for model in sorted({r["model"] for r in rows}):
        for batch in (1, 8):
            pick, ds = _best(rows, model, batch, "shardwise"), _best(rows, model, batch, "deepspeed")
            hf = _best(rows, model, batch, "hf")
            if 1 in pick and 2 in pick:
                speedup = pick[1]["per_token_ms"] / pick[2]["per_token_ms"]
                line = (f"- {model}, batch {batch}: shardwise per-token {pick[1]['per_token_ms']:.2f} ms (TP=1) -> "
                        f"{pick[2]['per_token_ms']:.2f} ms (TP=2): speed-up {speedup:.2f}x, scaling efficiency "
                        f"{speedup / 2:.0%}")
                if 2 in ds:
                    line += f"; DeepSpeed TP=2 {ds[2]['per_token_ms']:.2f} ms"
                if 1 in hf:
                    line += f"; HF eager {hf[1]['per_token_ms']:.2f} ms"
                out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repeats")
    parser.add_argument("--models", default=None, help=f"comma list of {list(MODELS)}")
    parser.add_argument("--dtypes", default="fp32", help="comma list of fp32,bf16")
    parser.add_argument("--frameworks", default="hf,shardwise,deepspeed")
    parser.add_argument("--cores", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--output", default=str(HERE / "results" / "inference.md"))
    parser.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per generate() (default 32; 155M: 16)")
    parser.add_argument("--repeats", type=int, default=None, help="generate() calls per batch (default 5; 155M: 2)")
    parser.add_argument("--ds-python", type=Path, default=DS_PYTHON, help="a venv's python with deepspeed 0.19.8")
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    models = args.models.split(",") if args.models else (["llama-tiny"] if args.quick else list(MODELS))
    frameworks = args.frameworks.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    if "deepspeed" in frameworks and not args.ds_python.exists():
        print(f"DeepSpeed rows skipped: {args.ds_python} not found (run benchmarks/setup_deepspeed_env.sh)")
        frameworks.remove("deepspeed")
    rows: list[dict] = []
    for model in models:
        path = str(ensure_model(model))
        big = model != "llama-tiny"
        for dtype in args.dtypes.split(","):
            for framework in frameworks:
                # one process may use every core (1 thread can be faster on a busy machine: both are run);
                # at TP=2 the ranks share the cores
                runs = [(1, t) for t in sorted({1, args.cores})] + ([] if framework == "hf" else
                                                                     [(2, max(1, args.cores // 2))])
                for tp, threads in runs:
                    spec = {"model": model, "path": path, "dtype": dtype, "framework": framework, "tp": tp,
                            "threads": threads, "batches": batches,
                            "python": str(args.ds_python) if framework == "deepspeed" else sys.executable,
                            "new_tokens": args.new_tokens or (16 if big else 32),
                            "repeats": args.repeats or (2 if args.quick or big else 5)}
                    print(f"{model} {dtype} {framework} tp={tp} threads={threads} ...", flush=True)
                    got = launch(spec, timeout=1800)
                    rows += got
                    for r in got:
                        print(f"  batch {r['batch']}: per-token {r['per_token_ms']:.2f} ms, "
                              f"{r['tokens_per_s']:.0f} tokens/s, TTFT {r['ttft_ms']:.1f} ms, load {r['load_s']:.2f}s, "
                              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    OUT.mkdir(exist_ok=True)
    with open(OUT / "inference.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    import torch

    text = (f"# Inference benchmark (preliminary)\n\n{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
            f"{args.cores} cores shared by all ranks (one process: 1 and {args.cores} threads; TP=2: "
            f"{max(1, args.cores // 2)} per rank; comparisons use each framework's fastest row), prompt {PROMPT} "
            "tokens, greedy. The machine was shared while this ran: treat timings as noisy.\n\n"
            + _table(rows) + "\n\n" + "\n".join(_scaling(rows)) + "\n")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
