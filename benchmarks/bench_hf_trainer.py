"""Hugging Face Trainer on 2 CPU ranks, three backends, the same script and model: Trainer + shardwise (as
DeepSpeed, ZeRO-2, through ``shardwise --num_gpus 2``), Trainer + DeepSpeed 0.19.8 (ZeRO-2, its own virtual
environment, through torchrun) and Trainer's FSDP2 path (``fsdp="full_shard"``, ``fsdp_version: 2``, torchrun).

Every run uses ``benchmarks/hf_trainer_worker.py`` unchanged: fp32, Trainer's AdamW, constant lr, a local random
Llama. Reported per backend: median step time after the warm-up steps (a step ends on the slower rank), tokens/s,
peak resident set per rank (``ru_maxrss``), and the first and last loss (the three must agree: same model, data and
global batch). Which implementation ``import deepspeed`` gave in the ranks is checked, not assumed.

Run:  python benchmarks/bench_hf_trainer.py             (Llama ~20M parameters, 12 steps; minutes on 2 cores)
      python benchmarks/bench_hf_trainer.py --quick     (tiny model, few steps: checks the benchmark works)
DeepSpeed's python: ``--deepspeed-python``, else $DEEPSPEED_PYTHON, else benchmarks/.venv-deepspeed
(``bash benchmarks/setup_deepspeed_env.sh``; it needs transformers and accelerate there too); without one, that row
is skipped. Writes ``benchmarks/results/hf_trainer.md`` (``--output``). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "benchmarks" / "hf_trainer_worker.py"
RESULTS = ROOT / "benchmarks" / "results" / "hf_trainer.md"
SIZES = {
    "quick": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "full": dict(vocab_size=8000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                 num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256),
}
SEQ = {"quick": 32, "full": 128}
STEPS = {"quick": 4, "full": 12}
WARMUP = 2
BATCH = 4  # per rank


def _save_model(size: dict, path: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**size, tie_word_embeddings=False))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _env(pythonpath: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", SHARDWISE_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def _run(name: str, cmd: list[str], env: dict[str, str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    steps = [max(ts) for ts in zip(*(r["times"] for r in ranks))][WARMUP:]
    return {"name": name, "impl": ranks[0]["impl"], "step_s": statistics.median(steps),
            "rss_mb": max(r["maxrss_mb"] for r in ranks), "losses": ranks[0]["losses"]}


def _deepspeed_python(arg: str | None) -> str | None:
    for candidate in (arg, os.environ.get("DEEPSPEED_PYTHON"), str(ROOT / "benchmarks/.venv-deepspeed/bin/python")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--deepspeed-python", default=None)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    kind = "quick" if args.quick else "full"
    seq, steps = SEQ[kind], STEPS[kind]
    tmp = Path(tempfile.mkdtemp(prefix="bench_hf_trainer-"))
    n_params = _save_model(SIZES[kind], tmp / "model")
    cfg = tmp / "zero2.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                               "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                               "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}))
    common = [str(WORKER), "--model", str(tmp / "model"), "--batch", str(BATCH), "--seq", str(seq),
              "--steps", str(steps)]
    def torchrun() -> list[str]:
        with socket.socket() as sock:  # a free port for this run's rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port)]

    rows = [_run("Trainer + shardwise (ZeRO-2)",
                 [sys.executable, "-m", "shardwise.launcher.cli", "--num_gpus", "2", *common, "--out",
                  str(tmp / "shardwise"), "--deepspeed", str(cfg)], _env(str(ROOT)), tmp / "shardwise")]
    ds_python = _deepspeed_python(args.deepspeed_python)
    if ds_python:
        rows.append(_run("Trainer + DeepSpeed 0.19.8 (ZeRO-2)",
                         [ds_python, *torchrun(), *common, "--out", str(tmp / "deepspeed"), "--deepspeed", str(cfg)],
                         _env(None), tmp / "deepspeed"))
    else:
        print("no DeepSpeed environment (--deepspeed-python / DEEPSPEED_PYTHON): DeepSpeed row skipped")
    rows.append(_run("Trainer FSDP2 (full_shard)", [sys.executable, *torchrun(), *common, "--out", str(tmp / "fsdp"),
                                                    "--fsdp"], _env(None), tmp / "fsdp"))
    tokens = 2 * BATCH * seq
    lines = [f"Llama {n_params / 1e6:.2f}M parameters, 2 CPU ranks x 1 thread, global batch {2 * BATCH} x {seq} "
             f"tokens, fp32, {steps} steps (median of the last {steps - WARMUP})", "",
             "| backend | step (ms) | tokens/s | peak RSS / rank (MB) | first loss | last loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['step_s'] * 1e3:.0f} | {tokens / r['step_s']:.0f} | {r['rss_mb']:.0f} | "
                     f"{r['losses'][0]:.5f} | {r['losses'][-1]:.5f} |")
    lines += ["", "`import deepspeed` in the ranks: " + "; ".join(f"{r['name']}: {r['impl']}" for r in rows
                                                                   if "fsdp" not in r["impl"])]
    text = "\n".join(lines) + "\n"
    print(text)
    first = [r["losses"][0] for r in rows]
    if max(first) - min(first) > 1e-4:
        print(f"WARNING: first losses differ: {first}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
