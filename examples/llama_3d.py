"""Train a LLaMA-style model with 3D parallelism: pipeline x tensor (+ Megatron sequence parallelism) x data.

The counterpart of Megatron-DeepSpeed's LLaMA pretraining script (``--pipeline-model-parallel-size``,
``--tensor-model-parallel-size``, ``--sequence-parallel``, ZeRO-1 / the BF16 optimizer across data-parallel
replicas), with the same flag names. On this machine (CPU, tiny dimensions, 8 ranks = PP 2 x TP 2 x DP 2):

    shardwise --num_gpus 8 examples/llama_3d.py --pipeline-model-parallel-size 2 \\
        --tensor-model-parallel-size 2 --sequence-parallel --train-iters 20

On a real cluster, the same script with real sizes, e.g. 4 nodes x 8 GPUs, PP 4 x TP 8 (within a node) x DP 1:

    shardwise --hostfile hostfile examples/llama_3d.py --pipeline-model-parallel-size 4 \\
        --tensor-model-parallel-size 8 --sequence-parallel --num-layers 32 --hidden-size 4096 \\
        --num-attention-heads 32 --num-key-value-heads 8 --seq-length 4096 --micro-batch-size 1 \\
        --global-batch-size 256 --bf16 --zero-stage 1 --init random

The model is ``shardwise.models.llama`` cut into pipeline layers (``shardwise.models.llama_pipe``): an
embedding layer, one layer per decoder block, and the final norm + LM head; the loss is the vocabulary-parallel
cross-entropy. ``--init plain`` (the default for small models) starts every layout from the weights of the same
single-process model, so losses do not depend on the layout; ``--init random`` lets each layer initialise its own
shard (no full copy of the model in memory).
The data is synthetic: sequences that count upwards from a random token (the model learns ``next = token + 1``).
Swap ``import shardwise as deepspeed`` for ``import deepspeed`` and the training loop is DeepSpeed's.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch.utils.data import Dataset

import shardwise as deepspeed
from shardwise.comm.topology import Topology
from shardwise.models.llama import Llama, LlamaConfig
from shardwise.models.llama_pipe import (  # noqa: F401 - re-exported: the layers this script trains
    BlockPipe,
    EmbeddingPipe,
    LlamaPipeLoss,
    NormHeadPipe,
    llama_name,
    llama_pipe_specs,
    load_plain_weights,
    pipe_name,
    stage_full_weights,
)
from shardwise.pipe import PipelineModule


# -- data -------------------------------------------------------------------------------------------------------------
class CountingTokens(Dataset):
    """``seq + 1`` tokens counting up (mod vocab) from a random start: inputs and next-token targets."""

    def __init__(self, vocab: int, seq: int, size: int = 4096, seed: int = 0) -> None:
        starts = torch.randint(0, vocab, (size, 1), generator=torch.Generator().manual_seed(seed))
        self.tokens = (starts + torch.arange(seq + 1)) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[i, :-1], self.tokens[i, 1:]


# -- the script -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--local_rank", type=int, default=-1, help="set by the launcher")
    add("--pipeline-model-parallel-size", "--pp", type=int, default=2, dest="pp")
    add("--tensor-model-parallel-size", "--tp", type=int, default=2, dest="tp")
    add("--sequence-parallel", action="store_true", help="Megatron sequence parallelism (needs tp > 1)")
    add("--virtual-stages", type=int, default=1, help="model chunks per pipeline rank (interleaved 1F1B)")
    add("--num-layers", type=int, default=4)
    add("--hidden-size", type=int, default=64)
    add("--ffn-hidden-size", type=int, default=None)
    add("--num-attention-heads", type=int, default=4)
    add("--num-key-value-heads", type=int, default=2)
    add("--vocab-size", type=int, default=128)
    add("--seq-length", type=int, default=32)
    add("--micro-batch-size", type=int, default=4)
    add("--global-batch-size", type=int, default=16)
    add("--train-iters", type=int, default=20)
    add("--lr", type=float, default=3e-3)
    add("--clip-grad", type=float, default=1.0)
    add("--zero-stage", type=int, default=1, choices=(0, 1))
    add("--bf16", action="store_true", help="bf16 weights; with ZeRO-1 the BF16 optimizer (fp32 accumulation)")
    add("--init", choices=("plain", "random"), default="plain", help="see the module docstring")
    add("--seed", type=int, default=1234)
    add("--save", default=None, help="save a checkpoint here at the end")
    add("--load", default=None, help="resume from a checkpoint saved here (any pipeline/tensor/data layout)")
    deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


def ds_config(args: argparse.Namespace) -> dict:
    """The ds_config.json Megatron-DeepSpeed's LLaMA script writes, for these flags."""
    cfg: dict[str, Any] = {
        "train_batch_size": args.global_batch_size, "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "steps_per_print": 5, "gradient_clipping": args.clip_grad, "zero_optimization": {"stage": args.zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": args.lr,
                                                      "warmup_num_steps": max(1, args.train_iters // 10)}},
        "pipeline": {"pipe_partitioned": True, "grad_partitioned": True},
    }
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    return cfg


def build(args: argparse.Namespace) -> tuple[Any, LlamaConfig]:
    """Topology, pipeline model and engine for ``args``."""
    deepspeed.init_distributed()
    topology = Topology(pp=args.pp, tp=args.tp)
    cfg = LlamaConfig(vocab_size=args.vocab_size, dim=args.hidden_size, n_layers=args.num_layers,
                      n_heads=args.num_attention_heads, n_kv_heads=args.num_key_value_heads,
                      ffn_hidden=args.ffn_hidden_size, max_seq_len=args.seq_length,
                      sequence_parallel=args.sequence_parallel and args.tp > 1)
    torch.manual_seed(args.seed)
    model = PipelineModule(llama_pipe_specs(cfg, topology), topology=topology, loss_fn=LlamaPipeLoss(topology),
                           partition_method="type:BlockPipe", virtual_stages=args.virtual_stages,
                           seed_layers=True, base_seed=args.seed)
    if args.init == "plain":
        torch.manual_seed(args.seed)
        load_plain_weights(model, cfg, Llama(cfg).state_dict())
    config = args.deepspeed_config if getattr(args, "deepspeed_config", None) else ds_config(args)
    data = CountingTokens(cfg.vocab_size, args.seq_length, seed=args.seed)
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, training_data=data)
    return engine, cfg


def main(argv: list[str] | None = None) -> list[float]:
    """Train; returns the loss of every step (on every rank)."""
    args = parse_args(argv)
    engine, cfg = build(args)
    if args.load:
        engine.load_checkpoint(args.load)
    if engine.global_rank == 0:
        n = sum(p.numel() for p in engine.module.parameters())
        print(f"LLaMA {cfg.n_layers} layers x {cfg.dim} on PP={engine.topology.size('pp')} x "
              f"TP={engine.topology.size('tp')} x DP={engine.topology.size('dp')}"
              f"{' + sequence parallel' if cfg.sequence_parallel else ''}; stage 0 holds {n:,} parameters; "
              f"{engine.gradient_accumulation_steps()} micro-batches of {engine.train_micro_batch_size_per_gpu()} "
              f"per step", flush=True)
    losses = []
    start = time.perf_counter()
    for _ in range(args.train_iters):
        losses.append(engine.train_batch().item())  # the data loader initialize() built, restarted as needed
    elapsed = time.perf_counter() - start
    if args.save:
        engine.save_checkpoint(args.save)
    if engine.global_rank == 0:
        print(f"trained {engine.global_steps} steps in {elapsed:.1f} s: loss {losses[0]:.3f} -> {losses[-1]:.3f}",
              flush=True)
    return losses


if __name__ == "__main__":
    main()
