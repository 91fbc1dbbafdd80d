"""DeepSpeed's ZeRO-Infinity on the model of ``bench_nvme_large.py`` (issue 22 item 2: "compare with DeepSpeed's
ZeRO-Infinity on the same model if it runs here, and record what happened").

Run (DeepSpeed 0.19.8 in its own venv; Debian's ``libaio-dev`` for its async I/O op):

    python benchmarks/bench_nvme_deepspeed.py --quick                 # a 4M-parameter smoke test of the same path
    python benchmarks/bench_nvme_deepspeed.py --steps 3                # the 2.05B LLaMA, 2 ranks, bf16, seq 128

The model is Hugging Face's ``LlamaForCausalLM`` with the shape of shardwise's reference LLaMA in
``bench_nvme_large.py`` (dim 2560, 24 layers, 20 heads, FFN 6832, vocabulary 32000, untied: 2.05B parameters),
built inside ``deepspeed.zero.Init`` so it is partitioned to NVMe as it is built, then trained with the same
config (ZeRO-3, ``offload_param`` and ``offload_optimizer`` on NVMe, AdamW, clipping 1.0, bf16, micro-batch 1, one
fixed batch per rank). Each step's forward, backward and optimizer time, the loss and peak RSS per rank are
recorded in ``benchmarks/results/nvme_deepspeed.json`` / ``.md``; a failure is recorded with its last lines.
shardwise never imports DeepSpeed: this file runs only in DeepSpeed's venv (transformers comes from the main venv).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from bench_nvme_large import offload_config, run_arguments  # noqa: E402  (stdlib-only at import: any venv)

RESULTS_DIR = HERE / "results"
DS_PYTHON = Path("/work/venvs/ds22/bin/python")
MAIN_SITE = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"), None)

FULL = {"hidden_size": 2560, "num_hidden_layers": 24, "num_attention_heads": 20, "intermediate_size": 6832,
        "vocab_size": 32000}
QUICK = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 688,
         "vocab_size": 1000}


def worker(args: argparse.Namespace) -> None:
    if MAIN_SITE is not None:
        sys.path.append(str(MAIN_SITE))  # transformers from the main venv, after DeepSpeed's own packages
    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shape = QUICK if args.quick else FULL
    config = offload_config(args, bf16=True)  # the shardwise run's config, as it is
    t0 = time.perf_counter()
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"],
                                  max_position_embeddings=args.seq, tie_word_embeddings=False)
    # resolved before zero.Init: transformers imports its modeling module lazily, and inside zero.Init that import
    # fails (DeepSpeed's patched tensor constructor does not match the signature transformers checks)
    llama = transformers.LlamaForCausalLM
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = llama(hf)
    n_params = sum(p.ds_numel for p in model.parameters())
    build_s = time.perf_counter() - t0
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if rank == 0:
        print(f"step -: zero.Init build {build_s:.0f} s, peak RSS {rss_built / 2**30:.2f} GiB", flush=True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    init_s = time.perf_counter() - t0 - build_s
    rss_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if rank == 0:
        print(f"step -: engine init {init_s:.0f} s, peak RSS {rss_init / 2**30:.2f} GiB", flush=True)
    g = torch.Generator().manual_seed(1234 + rank)
    ids = torch.randint(0, shape["vocab_size"], (1, args.seq), generator=g)
    steps = []
    for step in range(args.steps):
        phases = {}
        t = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        phases["forward_s"] = time.perf_counter() - t
        t = time.perf_counter()
        engine.backward(loss)
        phases["backward_s"] = time.perf_counter() - t
        t = time.perf_counter()
        engine.step()
        phases["optimizer_s"] = time.perf_counter() - t
        total = sum(phases.values())
        steps.append({"step": step, "loss": loss.item(), "step_s": total, **phases,
                      "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}  {total:.1f} s (fwd {phases['forward_s']:.1f}, bwd "
                  f"{phases['backward_s']:.1f}, opt {phases['optimizer_s']:.1f})  load {os.getloadavg()[0]:.1f}",
                  flush=True)
    mine = {"rank": rank, "steps": steps, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_after_build_bytes": rss_built, "rss_after_init_bytes": rss_init, "build_s": build_s,
            "engine_init_s": init_s}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"params": n_params, "shape": shape, "seq": args.seq, "ranks": world,
                                              "deepspeed": deepspeed.__version__, "torch": torch.__version__,
                                              "per_rank": everyone}, indent=1))
    dist.barrier()


def summarise(result: dict, command: str) -> str:
    lines = [f"`{command}`", ""]
    if "error" in result:
        return "\n".join(lines + [f"DeepSpeed {result.get('deepspeed', '0.19.8')} ZeRO-Infinity did not complete: "
                                  f"exit {result['returncode']} after {result['wall_s']:.0f} s. Last lines:", "",
                                  "```", *result["error"], "```"])
    lines += [f"DeepSpeed {result['deepspeed']} ZeRO-Infinity, HF LlamaForCausalLM {result['shape']} "
              f"({result['params'] / 1e9:.2f}B parameters), {result['ranks']} ranks, bf16, seq {result['seq']}, "
              f"load average before / after {result['loadavg'][0]} / {result['loadavg'][-1]}.", "",
              "| step | loss | step s | fwd s | bwd s | opt s |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {s['step']} | {s['loss']:.4f} | {s['step_s']:.1f} | {s['forward_s']:.1f} | {s['backward_s']:.1f} | "
              f"{s['optimizer_s']:.1f} |" for s in result["per_rank"][0]["steps"]]
    lines += ["", "; ".join(f"rank {p['rank']}: peak RSS {p['peak_rss_bytes'] / 2**30:.2f} GiB (after zero.Init "
                            f"{p['rss_after_build_bytes'] / 2**30:.2f}, after engine init "
                            f"{p['rss_after_init_bytes'] / 2**30:.2f}), build {p['build_s']:.0f} s + engine init "
                            f"{p['engine_init_s']:.0f} s" for p in result["per_rank"])]
    return "\n".join(lines)


def main() -> None:
    ap = run_arguments(__doc__.splitlines()[0], steps=3, nvme="/work/nvme_bench_ds")
    ap.add_argument("--ds-python", type=Path, default=DS_PYTHON)
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    nvme = Path(args.nvme)
    nvme.mkdir(parents=True, exist_ok=True)
    out = nvme / "result.json"
    cmd = [str(args.ds_python), "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
           str(Path(__file__).resolve()), "--worker", "--out", str(out), "--steps", str(args.steps), "--seq",
           str(args.seq), "--lr", str(args.lr), "--sub_group", str(args.sub_group), "--nvme", str(nvme)]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "lo"}
    load = [open("/proc/loadavg").read().split()[0]]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        try:
            output, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the agent and its ranks
            output, _ = proc.communicate()
            output += f"\n[rank0]: stopped by this benchmark after its --timeout of {args.timeout} s"
        load.append(open("/proc/loadavg").read().split()[0])
        if proc.returncode == 0:
            result = json.loads(out.read_text())
        else:
            lines = [line for line in output.splitlines() if line.strip()]
            rank0 = [line for line in lines if line.startswith("[rank0]:") or line.startswith("step ")]
            tail = (rank0 or lines)[-25:]  # the worker's traceback and steps, not the agent's report
            result = {"error": tail, "returncode": proc.returncode, "wall_s": time.perf_counter() - start}
        print(output[-4000:])
    finally:
        shutil.rmtree(nvme, ignore_errors=True)
    result["loadavg"] = load
    command = "python benchmarks/bench_nvme_deepspeed.py " + " ".join(sys.argv[1:])
    report = summarise(result, command.strip())
    print(report)
    if not args.quick:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "nvme_deepspeed.json").write_text(json.dumps(result, indent=1))
        (RESULTS_DIR / "nvme_deepspeed.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
