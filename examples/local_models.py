"""Small models the inference examples build locally (the Hugging Face hub is not needed, nor reachable here).

``ensure_model(kind, directory)`` returns a Hugging Face model directory (config.json, safetensors weights,
tokenizer files), building it first if it is absent: a byte-level BPE tokenizer trained with the ``tokenizers``
package on the repository's own Markdown files, and a small BLOOM or LLaMA-architecture model briefly trained on
the same text so that generations look like text rather than noise. Building takes a few seconds on one CPU core
and happens once; later runs load the saved files.
"""

from __future__ import annotations

import glob
import os
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FALLBACK_TEXT = ("shardwise splits a model over several processes. Each rank keeps a slice of every weight and the "
                 "ranks add their partial results. DeepSpeed users change one import line. ") * 50


def share_cores(local_ranks: int) -> None:
    """On CPU, give each rank its share of the cores unless OMP_NUM_THREADS (or ``shardwise
    --bind_cores_to_rank``) already did: ranks that each start one thread per core oversubscribe the machine, and
    every per-layer collective then waits for a descheduled peer."""
    from shardwise.accelerator import get_accelerator

    if "OMP_NUM_THREADS" not in os.environ and get_accelerator().device_name() == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local_ranks)))


def corpus() -> str:
    """The repository's Markdown files (README, docs), or a fallback paragraph."""
    files = sorted(glob.glob(os.path.join(ROOT, "*.md")) + glob.glob(os.path.join(ROOT, "docs", "*.md")))
    text = "\n\n".join(open(f, encoding="utf-8").read() for f in files)
    return text if len(text) > 2000 else FALLBACK_TEXT


def build_tokenizer(directory: str, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``corpus()`` and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus().splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="left")
    fast.save_pretrained(directory)
    return fast


def _config(kind: str, vocab: int, pad: int, bos: int, eos: int):
    import transformers

    ids = dict(vocab_size=vocab, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    if kind == "bloom":
        return transformers.BloomConfig(hidden_size=128, n_layer=2, n_head=8, **ids)
    if kind == "llama":
        return transformers.LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                                        **ids)
    raise ValueError(f"unknown kind {kind!r}: use 'bloom' or 'llama'")


def _train(model, tokenizer, steps: int, block: int = 64, batch: int = 8) -> float:
    """A few hundred AdamW steps on ``corpus()``; returns the final loss."""
    data = torch.tensor(tokenizer(corpus())["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + block] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def ensure_model(kind: str, directory: str, train_steps: int = 300, shard_size: str = "5GB") -> str:
    """The model directory for ``kind`` ("bloom" or "llama"), built (tokenizer, model, weights) if absent."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    os.makedirs(directory, exist_ok=True)
    tok = build_tokenizer(directory)
    torch.manual_seed(0)
    config = _config(kind, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    loss = _train(model, tok, train_steps)
    model.eval().save_pretrained(directory, max_shard_size=shard_size)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {kind} model ({params / 1e6:.1f}M parameters, {train_steps} training steps, loss {loss:.2f}) "
          f"in {time.perf_counter() - start:.1f}s -> {directory}", flush=True)
    return directory
