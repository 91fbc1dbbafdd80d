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
from typing import TYPE_CHECKING, Any

import torch

from shardwise import comm
from shardwise.checkpoint import async_writer, collect, manifest_check, model_view, restore, stale
from shardwise.checkpoint.commit import SaveJob
from shardwise.checkpoint.errors import (
    CheckpointArgumentError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointIncompleteError,
)
from shardwise.checkpoint.files import MANIFEST, CheckpointReader, TensorSpec, read_latest, write_safetensors
from shardwise.checkpoint.safety import atomic_file
from shardwise.common.logging import log_dist, logger

if TYPE_CHECKING:
    from shardwise.engine.engine import Engine



def _check_tag(tag: Any) -> str:
    tag = str(tag)
    if not tag or tag in (".", "..") or "/" in tag or os.sep in tag or tag.startswith(".tmp-") or "\0" in tag:
        raise CheckpointArgumentError(f"checkpoint tag {tag!r} is not a plain directory name; use e.g. "
                                      "'global_step100'")
    return tag


def _check_dir(path: Any, what: str) -> str:
    """``path`` as a string; CheckpointArgumentError (a ValueError, as DeepSpeed raises) unless a non-empty path."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path:
        raise CheckpointArgumentError(f"{what} must be a non-empty directory path, got {path!r}")
    return path


def _agree(engine: Engine, save_dir: Any, tag: Any) -> tuple[str, str, str]:
    """All ranks: (save_dir, tag to use (rank 0's), fresh save id); applies ``checkpoint.tag_validation``.

    The arguments are checked inside the one collective, so a bad argument on any rank raises on every rank
    instead of leaving the others waiting in the next collective.
    """
    problem = None
    try:
        save_dir = _check_dir(save_dir, "save_dir")
        tag = _check_tag(tag if tag is not None else f"global_step{engine.global_steps}")
    except CheckpointError as exc:
        problem = str(exc)
    gathered = comm.all_gather_object((str(tag), secrets.token_hex(4), problem))
    bad = [(r, p) for r, (_, _, p) in enumerate(gathered) if p is not None]
    if bad:
        raise CheckpointArgumentError(f"save_checkpoint: {_by_rank(bad)}")
    tags = sorted({t for t, _, _ in gathered})
    if len(tags) > 1:
        mode = engine.config.checkpoint.tag_validation
        msg = f"ranks passed different checkpoint tags {tags[:4]}; pass the same tag on every rank"
        if mode == "Fail":
            raise CheckpointError(msg + " (checkpoint.tag_validation is 'Fail')")
        if mode == "Warn":
            logger.warning("%s; saving under rank 0's tag %r", msg, gathered[0][0])
    return save_dir, gathered[0][0], gathered[0][1]


def _by_rank(bad: list[tuple[int, str]]) -> str:
    """"ranks 0, 1: <text>; rank 3: <other text>": each distinct message once, with the ranks that reported it."""
    by_text: dict[str, list[int]] = {}
    for rank, text in bad:
        by_text.setdefault(text, []).append(rank)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs[:8]))}: {text}"
                     for text, rs in list(by_text.items())[:4])


_KINDS = {cls.__name__: cls for cls in (CheckpointError, CheckpointCorruptError, CheckpointIncompleteError,
                                        CheckpointArgumentError)}


def _describe(error: BaseException) -> tuple[str, str]:
    """One rank's failure: (its checkpoint error class, or "", and text). Our own errors speak for themselves."""
    if type(error).__name__ in _KINDS and isinstance(error, CheckpointError):
        return type(error).__name__, str(error)
    return "", f"{type(error).__name__}: {error}"


def _all_ok(error: BaseException | None, what: str) -> None:
    """All ranks: raise the same error (same class, same text) everywhere if any rank failed ``what``."""
    errors = comm.all_gather_object(None if error is None else _describe(error))
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        detail = _by_rank([(r, text) for r, (_, text) in bad])
        kinds = {kind for _, (kind, _) in bad}
        cls = _KINDS[kinds.pop()] if len(kinds) == 1 and "" not in kinds else CheckpointError
        raise cls(f"{what} failed on {len(bad)} rank(s): {detail}") from error


def _sweep(save_dir: str) -> None:
    """One rank per host: remove temporaries of killed saves (see [Note: stale temporaries]); never fails a save."""
    if comm.get_local_rank() != 0:
        return
    try:
        result = stale.sweep(save_dir)
    except OSError as exc:
        logger.debug("stale temporaries in %s not checked: %s", save_dir, exc)
        return
    if result.removed:
        log_dist(f"removed {len(result.removed)} temporary file(s) ({result.removed_bytes / 2**20:.1f} MB) left by "
                 f"killed saves in {save_dir}", ranks=None)
    if result.kept:
        logger.info("%d temporary file(s) (%.1f MB) in %s belong to saves of other hosts, boots or running "
                    "processes; left in place", result.kept, result.kept_bytes / 2**20, save_dir)


def save_checkpoint(engine: Engine, save_dir: str, tag: str | None = None, client_state: dict | None = None,
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
    save_dir, tag, save_id = _agree(engine, save_dir, tag)
    _sweep(save_dir)
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
    job = SaveJob(save_dir=save_dir, tag=tag, save_id=save_id, rank=rank, world_size=world, snapshot=snap,
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


def wait_for_checkpoint(engine: Engine) -> None:
    """Block until this engine's asynchronous save is durable (and committed, on rank 0); raise if it failed."""
    async_writer.wait(engine)


def _verify(reader: CheckpointReader) -> None:
    """All ranks: every file's size and sha256 checked once (file i by rank i mod world); same error everywhere."""
    rank, world = comm.get_rank(), comm.get_world_size()
    mine = [i for i in range(len(reader.files)) if i % world == rank]
    errors = [e for per_rank in comm.all_gather_object(reader.verify(mine)) for e in per_rank]
    if errors:
        raise CheckpointCorruptError("; ".join(errors))


def _open(engine: Engine, load_dir: Any, tag: Any, module_only: bool) -> CheckpointReader | None:
    """All ranks: the checkpoint to load (None: no ``latest`` and no tag). One collective: if any rank cannot open
    it (bad argument, empty ``latest``, damaged manifest), every rank raises the same error."""
    reader, error = None, None
    try:
        load_dir = _check_dir(load_dir, "load_dir")
        if tag is None:
            tag = read_latest(load_dir, universal=bool(engine.config.checkpoint.load_universal))
        if tag is not None:
            reader = CheckpointReader(os.path.join(load_dir, _check_tag(tag)))
            if not module_only:
                manifest_check.validate_training_state(reader.manifest, os.path.join(reader.tag_dir, MANIFEST))
    except CheckpointError as exc:
        error = exc
    found = comm.all_gather_object(reader is not None)
    _all_ok(error, "opening the checkpoint")
    if any(found) and not all(found):
        raise CheckpointIncompleteError(f"ranks {[r for r, f in enumerate(found) if not f]} found no 'latest' file "
                                        f"in {load_dir} while others did: is {load_dir} shared by all nodes?")
    return reader


def load_checkpoint(engine: Engine, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[str | None, dict | None]:
    """Load a checkpoint saved by any layout (data-parallel size, ZeRO stage) into this engine.

    Returns ``(path of the tag directory, client_state)``, or ``(None, None)`` when ``tag`` is None and
    ``load_dir`` has no ``latest`` file (as DeepSpeed); an empty or unreadable ``latest`` is an error, not "no
    checkpoint". ``load_module_only`` loads the weights and nothing else; ``load_optimizer_states=False`` keeps the
    optimizer fresh (the fp32 masters still come from the checkpoint). Every failure raises on every rank.
    """
    async_writer.wait(engine)
    start = time.perf_counter()
    reader = _open(engine, load_dir, tag, load_module_only)
    if reader is None:
        logger.warning("no 'latest' file in %s: pass tag=... to load a specific checkpoint; nothing loaded", load_dir)
        return None, None
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
    layout = reader.manifest.get("layout", {})
    log_dist(f"loaded {reader.tag_dir} in {time.perf_counter() - start:.2f} s (saved by "
             f"{layout.get('world_size', '?')} rank(s), ZeRO stage {layout.get('zero_stage', '?')})", ranks=[0])
    return reader.tag_dir, client


def _is_partitioned(mt: model_view.ModelTensor) -> bool:
    local = tuple(getattr(mt.tensor, "ds_shape", None) or mt.tensor.shape)
    return mt.managed and tuple(mt.tensor.shape) != local


@torch.no_grad()
def _full_value(engine: Engine, mt: model_view.ModelTensor) -> torch.Tensor:
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


def consolidated_16bit_state_dict(engine: Engine, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
    """The full model weights in the training dtype, on rank 0 (every other rank gets ``{}``). Every rank must call
    it: ZeRO-3 shards and tensor-parallel pieces are gathered. Tied weights appear under every name."""
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
    return state


def save_16bit_model(engine: Engine, save_dir: str, save_filename: str = "pytorch_model.bin",
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
    state = consolidated_16bit_state_dict(engine, exclude_frozen_parameters)
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
