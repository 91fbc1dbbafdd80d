"""Checkpoint resolution, header validation and sliced reads of the inference loader, in one process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from shardwise.inference import autotp, loader
from shardwise.inference.loader import CheckpointError, TensorShard
from tests.inference_models import save, tiny_config, tiny_model


def _meta(name: str) -> nn.Module:
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(name))
    autotp.tie_declared_weights(model)  # as init_inference does (5.0 leaves a meta model untied)
    return model


def _load_tp1(model: nn.Module, files, window: int = loader.MAP_WINDOW_BYTES) -> loader.LoadStats:
    plan = autotp.plan_tensor_parallel(model, 1)
    targets = autotp.load_targets(model, {}, plan.tied)
    stats = loader.load_checkpoint(files, targets, torch.float32, torch.device("cpu"), window)
    autotp.retie(model, plan.tied)
    return stats


# -- resolving a checkpoint ---------------------------------------------------------------------------------------
def test_resolve_directory_index_json_dict_and_base_dir(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "m", max_shard_size="100KB")
    shards = sorted((tmp_path / "m").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "m" / "model.safetensors.index.json").exists()
    assert loader.resolve_checkpoint(tmp_path / "m") == shards
    names = [p.name for p in shards]
    desc = {"type": "LLAMA", "checkpoints": names, "version": 1.0}
    assert loader.resolve_checkpoint(desc, base_dir=str(tmp_path / "m")) == shards
    (tmp_path / "m" / "ckpt.json").write_text(json.dumps(desc))
    assert loader.resolve_checkpoint(tmp_path / "m" / "ckpt.json") == shards  # relative to the JSON's directory
    assert loader.resolve_checkpoint("ckpt.json", base_dir=str(tmp_path / "m")) == shards
    assert loader.resolve_checkpoint(shards[0]) == [shards[0]]


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        loader.resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weight files"):
        loader.resolve_checkpoint(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        loader.resolve_checkpoint(tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match="no 'checkpoints' list"):
        loader.resolve_checkpoint({"type": "BLOOM", "version": 1.0})
    with pytest.raises(CheckpointError, match="lists 'gone.safetensors'.*does not exist"):
        loader.resolve_checkpoint({"checkpoints": ["gone.safetensors"]}, base_dir=str(tmp_path))


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:5], "no header"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "corrupted header"),
    (lambda b: b[:8] + b"#" + b[9:], "not valid JSON"),
    (lambda b: b[: len(b) - 100], "outside the file"),
])
def test_header_validation(tmp_path, damage, message):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(10, 10), "b": torch.zeros(50)}, str(path))
    assert set(loader.read_safetensors_header(path)) == {"a", "b"}
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        loader.read_safetensors_header(path)


# -- reading ------------------------------------------------------------------------------------------------------
def test_materialize_ranges_transpose_and_dtype():
    full = torch.arange(6 * 8, dtype=torch.float32).view(6, 8)  # stored [in=6, out=8] like a Conv1D
    shard = TensorShard(nn.Module(), "weight", (6, 8), dim=1, ranges=((0, 2), (4, 6)), transpose=True)
    out, nbytes, itemsize = loader._materialize(lambda index: full[index], shard, torch.bfloat16,
                                                torch.device("cpu"))
    assert out.shape == (4, 6) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out.float(), torch.cat([full[:, 0:2], full[:, 4:6]], 1).t())
    assert nbytes == 4 * 6 * 4 and itemsize == 4
    ids = torch.arange(5)  # integer tensors keep their dtype
    whole, _, _ = loader._materialize(lambda i: ids[i], TensorShard(nn.Module(), "x", (5,)), torch.float16,
                                      torch.device("cpu"))
    assert whole.dtype == torch.int64


@pytest.mark.parametrize("window", [loader.MAP_WINDOW_BYTES, 1])  # window 1: reopen the file for every tensor
def test_meta_model_loads_exactly_in_file_order(tmp_path, window):
    model = tiny_model("gpt2")
    save(model, tmp_path)
    meta = _meta("gpt2")
    stats = _load_tp1(meta, loader.resolve_checkpoint(tmp_path), window)
    for (name, p), (_, ref) in zip(meta.named_parameters(), model.named_parameters()):
        assert torch.equal(p, ref), name
    assert meta.lm_head.weight is meta.transformer.wte.weight  # re-tied after loading
    assert stats.bytes_read == stats.bytes_full == sum(p.numel() * 4 for p in model.parameters())
    assert stats.split_bytes_read == 0 and stats.unexpected_keys == []


def test_prefix_renames_and_unexpected_keys(tmp_path):
    """An old BLOOM checkpoint saved from the base model (no ``transformer.`` prefix) plus a stray key."""
    model = tiny_model("bloom")
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["h.0.self_attention.masked_bias"] = torch.zeros(1)
    save_file(state, str(tmp_path / "old.safetensors"))
    meta = _meta("bloom")
    stats = _load_tp1(meta, [tmp_path / "old.safetensors"])
    assert stats.unexpected_keys == ["h.0.self_attention.masked_bias"]
    assert torch.equal(meta.lm_head.weight, model.lm_head.weight)


def test_shape_mismatch_and_missing_tensors(tmp_path):
    model = tiny_model("llama")
    state = model.state_dict()
    save_file({**state, "model.norm.weight": torch.ones(7)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[7\] but the model expects \[64\]"):
        _load_tp1(_meta("llama"), [tmp_path / "wrong.safetensors"])
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 model tensors are missing .*'model.norm.weight'"):
        _load_tp1(_meta("llama"), [tmp_path / "partial.safetensors"])


def test_corrupted_torch_pickle(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot be read as a torch checkpoint"):
        _load_tp1(_meta("llama"), loader.resolve_checkpoint(tmp_path))


def test_rank0_slices_of_a_split_model(tmp_path):
    """Without ranks, a 2-way group seen from rank 0: the loader reads rank 0's half of every split tensor."""
    from shardwise.comm.group import Group

    model = tiny_model("llama")
    save(model, tmp_path)
    meta = _meta("llama")
    plan = autotp.plan_tensor_parallel(meta, 2)
    split = autotp.apply_tensor_parallel(meta, plan, Group("tp", (0, 1)))
    stats = loader.load_checkpoint(loader.resolve_checkpoint(tmp_path), autotp.load_targets(meta, split, plan.tied),
                                   torch.float32, torch.device("cpu"))
    attn, ref = meta.model.layers[1].self_attn, model.model.layers[1].self_attn
    assert torch.equal(attn.q_proj.weight, ref.q_proj.weight[:32]) and torch.equal(attn.k_proj.weight,
                                                                                ref.k_proj.weight[:16])
    assert torch.equal(attn.o_proj.weight, ref.o_proj.weight[:, :32])
    assert attn.num_key_value_groups == 2
    assert stats.split_bytes_read * 2 == stats.split_bytes_full
