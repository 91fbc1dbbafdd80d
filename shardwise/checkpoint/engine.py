"""The engine's checkpoint methods: ``save_checkpoint``, ``load_checkpoint``, ``save_16bit_model``.

``Engine`` delegates here. Saving: agree on the tag and a save id (one tiny collective), snapshot this rank's state
(``collect.py``), write and commit it (``commit.py``; in the background with ``checkpoint.async_save``). Loading:
find the tag (``latest``), verify every file's size and sha256 (each file hashed by one rank), then load into the
current layout (``restore.py``), whatever layout saved it. DeepSpeed's signatures and return values are kept:
``save_checkpoint`` returns True; ``load_checkpoint`` returns ``(load_path, client_state)``, or ``(None, None)``
when there is no ``latest`` file and no tag was given.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

import torch

from shardwise import comm
from shardwise.checkpoint import async_writer, collect, model_view, restore
from shardwise.checkpoint.commit import SaveJob
from shardwise.checkpoint.errors import CheckpointCorruptError, CheckpointError
from shardwise.checkpoint.files import CheckpointReader, TensorSpec, read_latest, write_safetensors
from shardwise.checkpoint.safety import atomic_file
from shardwise.utils.logging import log_dist, logger


def _check_tag(tag: str) -> str:
    tag = str(tag)
    if not tag or tag in (".", "..") or "/" in tag or os.sep in tag or tag.startswith(".tmp-"):
        raise CheckpointError(f"checkpoint tag {tag!r} is not a plain directory name; use e.g. 'global_step100'")
    return tag


def _agree(engine: Any, tag: str) -> tuple[str, str]:
    """All ranks: the tag to use (rank 0's) and a fresh save id; applies ``checkpoint.tag_validation``."""
    gathered = comm.all_gather_object((tag, secrets.token_hex(4)))
    tags = sorted({t for t, _ in gathered})
    if len(tags) > 1:
        mode = engine.config.checkpoint.tag_validation
        msg = f"ranks passed different checkpoint tags {tags[:4]}; pass the same tag on every rank"
        if mode == "Fail":
            raise CheckpointError(msg + " (checkpoint.tag_validation is 'Fail')")
        if mode == "Warn":
            logger.warning("%s; saving under rank 0's tag %r", msg, gathered[0][0])
    return gathered[0][0], gathered[0][1]


def _all_ok(error: BaseException | None, what: str) -> None:
    """All ranks: raise the same error everywhere if any rank failed ``what``."""
    errors = comm.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        detail = "; ".join(f"rank {r}: {e}" for r, e in bad[:4])
        raise CheckpointError(f"{what} failed on {len(bad)} rank(s): {detail}") from error


def save_checkpoint(engine: Any, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                    save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
    """Save the engine's full training state under ``save_dir/tag`` (every rank must call it). Returns True.

    The checkpoint holds module weights (fp32 masters and model-dtype values), frozen parameters and buffers
    (unless ``exclude_frozen_parameters``), optimizer state, loss scaler, LR scheduler, step counters, every rank's
    RNG state and ``client_state`` (JSON values and tensors). ``latest`` names it once it is committed (when
    ``save_latest``). With ``checkpoint.async_save`` the files are written in the background; see
    ``async_writer.py``.
    """
    async_writer.wait(engine)
    start = time.perf_counter()
    tag, save_id = _agree(engine, _check_tag(tag if tag is not None else f"global_step{engine.global_steps}"))
    rank, world = comm.get_rank(), comm.get_world_size()
    background = bool(engine.config.checkpoint.async_save)
    error: BaseException | None = None
    snap = None
    view = model_view.named_tensors(engine)
    try:
        snap = collect.snapshot(engine, view, client_state=client_state if client_state is not None else {},
                                exclude_frozen=exclude_frozen_parameters, copy=background, rank=rank)
    except Exception as exc:
        error = exc
    _all_ok(error, "preparing the checkpoint")
    job = SaveJob(save_dir=str(save_dir), tag=tag, save_id=save_id, rank=rank, world_size=world, snapshot=snap,
                  save_latest=save_latest)
    if background:
        async_writer.start(engine, job)
        log_dist(f"saving {job.tag_dir} in the background ({snap.nbytes / 2**20:.1f} MB on this rank; "
                 f"snapshot took {time.perf_counter() - start:.2f} s)", ranks=[0])
        return True
    try:
        job.write_rank_files()
    except Exception as exc:
        error = exc
    _all_ok(error, f"writing checkpoint {job.tag_dir}")
    if rank == 0:
        try:
            job.commit(poll=False)
        except Exception as exc:
            error = exc
    _all_ok(error, f"committing checkpoint {job.tag_dir}")
    log_dist(f"saved {job.tag_dir} in {time.perf_counter() - start:.2f} s", ranks=[0])
    return True


def wait_for_checkpoint(engine: Any) -> None:
    """Block until this engine's asynchronous save is durable (and committed, on rank 0); raise if it failed."""
    async_writer.wait(engine)


def _verify(reader: CheckpointReader) -> None:
    """All ranks: every file's size and sha256 checked once (file i by rank i mod world); same error everywhere."""
    rank, world = comm.get_rank(), comm.get_world_size()
    mine = [i for i in range(len(reader.files)) if i % world == rank]
    errors = [e for per_rank in comm.all_gather_object(reader.verify(mine)) for e in per_rank]
    if errors:
        raise CheckpointCorruptError("; ".join(errors))


def load_checkpoint(engine: Any, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[str | None, dict | None]:
    """Load a checkpoint saved by any layout (data-parallel size, ZeRO stage) into this engine.

    Returns ``(path of the tag directory, client_state)``, or ``(None, None)`` when ``tag`` is None and
    ``load_dir`` has no ``latest`` file (as DeepSpeed). ``load_module_only`` loads the weights and nothing else;
    ``load_optimizer_states=False`` keeps the optimizer fresh (the fp32 masters still come from the checkpoint).
    """
    async_writer.wait(engine)
    start = time.perf_counter()
    if tag is None:
        tag = read_latest(str(load_dir), universal=bool(engine.config.checkpoint.load_universal))
        if tag is None:
            logger.warning("no 'latest' file in %s: pass tag=... to load a specific checkpoint; nothing loaded",
                           load_dir)
            return None, None
    reader = CheckpointReader(os.path.join(str(load_dir), _check_tag(tag)))
    try:
        _verify(reader)
        view = model_view.named_tensors(engine)
        error: BaseException | None = None
        client = None
        try:  # local reads and writes only: a failure on one rank must not leave the others inside a collective
            restore.load_model(engine, reader, view, strict=load_module_strict,
                               optimizer=load_optimizer_states and not load_module_only, custom_load_fn=custom_load_fn)
            if not load_module_only:
                restore.load_training_state(engine, reader, scheduler=load_lr_scheduler_states,
                                            world_size=comm.get_world_size(), rank=comm.get_rank())
            client = restore.client_state(reader)
        except Exception as exc:
            error = exc
        _all_ok(error, f"loading {reader.tag_dir}")
        restore.finish(engine)
    finally:
        reader.close()
    layout = reader.manifest["layout"]
    log_dist(f"loaded {reader.tag_dir} in {time.perf_counter() - start:.2f} s (saved by {layout['world_size']} "
             f"rank(s), ZeRO stage {layout['zero_stage']})", ranks=[0])
    return reader.tag_dir, client


def _is_partitioned(mt: model_view.ModelTensor) -> bool:
    local = tuple(getattr(mt.tensor, "ds_shape", None) or mt.tensor.shape)
    return mt.managed and tuple(mt.tensor.shape) != local


@torch.no_grad()
def _full_value(engine: Any, mt: model_view.ModelTensor) -> torch.Tensor:
    """The whole tensor in the model's dtype, as a host copy (gathered when this rank holds only part of it)."""
    t = mt.tensor
    if _is_partitioned(mt):  # ZeRO-3: fragments of all ranks are disjoint, so their sum is the tensor
        local = tuple(t.ds_shape)
        flat = torch.zeros(torch.Size(local).numel(), dtype=torch.float32)
        for frag in engine.strategy.fragments(t):
            src = frag.model if frag.model is not None else frag.fp32
            flat[frag.start : frag.end] = src.float().cpu()
        comm.all_reduce(flat, group=engine.strategy.state_group)
        t = flat.to(t.dtype).view(local)
    if mt.tp_split:  # each rank places its blocks into zeros; the sum over the tensor group is the full tensor
        full = torch.zeros(mt.shape, dtype=torch.float32)
        local, pos = t.detach().float().cpu(), 0
        for box in mt.boxes:
            lo, hi = box[mt.split_dim]
            full[tuple(slice(a, b) for a, b in box)] = local.narrow(mt.split_dim, pos, hi - lo)
            pos += hi - lo
        comm.all_reduce(full, group=engine.topology.tp_group)
        t = full.to(t.dtype)
    return t.detach().to("cpu", copy=True)


def save_16bit_model(engine: Any, save_dir: str, save_filename: str = "pytorch_model.bin",
                     exclude_frozen_parameters: bool = False) -> bool:
    """Write the full model weights in the training dtype to ``save_dir/save_filename`` (rank 0). Returns True.

    With ZeRO-3 the weights are gathered only when ``stage3_gather_16bit_weights_on_model_save`` is set; otherwise
    nothing is written and False is returned, as DeepSpeed does.

    A ``.safetensors`` name writes safetensors; any other name writes a torch file holding a plain dict of tensors
    (readable with ``torch.load(path, weights_only=True)``), as DeepSpeed's ``pytorch_model.bin``. Tied weights
    appear under every name, as in ``module.state_dict()``.
    """
    if engine.zero_optimization_stage() == 3 and \
            not engine.config.zero_optimization.stage3_gather_16bit_weights_on_model_save:
        log_dist("save_16bit_model: nothing saved, because ZeRO-3 weights are only gathered for saving with "
                 "zero_optimization.stage3_gather_16bit_weights_on_model_save: true (as DeepSpeed); returning False",
                 ranks=[0])
        return False
    tensors, aliases, _ = model_view.named_tensors(engine)
    state: dict[str, torch.Tensor] = {}
    for mt in tensors:
        if exclude_frozen_parameters and mt.is_param and not mt.tensor.requires_grad:
            continue
        if comm.get_rank() == 0 or mt.tp_split or _is_partitioned(mt):  # the others only join collectives
            value = _full_value(engine, mt)
            if comm.get_rank() == 0:
                state[mt.name] = value
    for alias, target in aliases.items():
        if target in state:
            state[alias] = state[target]
    error: BaseException | None = None
    if comm.get_rank() == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            path = os.path.join(save_dir, save_filename)
            if save_filename.endswith(".safetensors"):
                write_safetensors(path, [TensorSpec.of(k, v.contiguous()) for k, v in state.items()],
                                  {"format": "pt"})
            else:
                with atomic_file(path) as f:
                    torch.save(state, f)
            log_dist(f"saved 16-bit model weights to {path}", ranks=[0])
        except Exception as exc:
            error = exc
    _all_ok(error, "save_16bit_model")
    return True
