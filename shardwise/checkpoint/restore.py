"""Loading a checkpoint into an engine of any layout: weights and optimizer state through fragments, then the rest.

For each tensor of the current model: a parameter the strategy manages gets, for every fragment this rank holds
now, the overlapping ranges of the saved fp32 masters (and optimizer state) from whichever shards hold them; then
the model-dtype weights are republished from the masters (:func:`republish`). Frozen parameters and buffers are
read whole. Optimizer state that torch creates lazily is materialised first (``optim_state.materialize``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from shardwise.checkpoint import codec, model_view, optim_state, rng
from shardwise.checkpoint.errors import CheckpointCorruptError, CheckpointError
from shardwise.checkpoint.files import WEIGHT_KINDS, CheckpointReader
from shardwise.common.logging import logger
from shardwise.common.progress import progress

if TYPE_CHECKING:
    from shardwise.engine.engine import Engine


_FULL_KINDS = ("value", "fp32", "model")


def _fetcher(reader: CheckpointReader, file_index: int | None = None) -> Callable[[str], torch.Tensor]:
    """Reads entries of one file (default: the one holding rank 0's global tensors)."""
    index = reader.manifest.get("global_file", 0) if file_index is None else file_index
    return lambda key: reader.read_entry(index, key)


@contextlib.contextmanager
def _part(reader: CheckpointReader, what: str) -> Iterator[None]:
    """Restoring ``what`` from the manifest: a malformed value there is a CheckpointCorruptError naming it, not a
    KeyError or ValueError from deep inside a ``load_state_dict``."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        detail = f"entry {exc.args[0]!r} is missing" if isinstance(exc, KeyError) and exc.args else str(exc)
        raise CheckpointCorruptError(
            f"{reader.tag_dir}/manifest.json: the saved {what} cannot be restored ({detail}); the manifest was damaged "
            "or edited, or written by an incompatible version. Restore it from a copy, or load an earlier tag") from exc


def republish(engine: Engine) -> None:
    """Make the model's weights current from the fp32 masters after they were written (every stage's way)."""
    if engine.strategy is not None:
        engine.strategy.publish_weights()


def _check_names(reader: CheckpointReader, tensors: list[model_view.ModelTensor], strict: bool) -> None:
    missing, used = [], set()
    excluded = set(reader.manifest.get("excluded", []))
    for mt in tensors:
        src = reader.resolve(mt.name)
        if src is None:
            if mt.name not in excluded:
                missing.append(mt.name)
            continue
        used.add(src)
        saved = tuple(reader.tensors[src]["shape"])
        if saved != tuple(mt.shape):
            raise CheckpointError(f"{mt.name}: the checkpoint holds shape {saved}, the model has {tuple(mt.shape)}; "
                                  "build the model with the configuration it was saved with")
    unexpected = [n for n in reader.tensors if n not in used]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"the checkpoint {reader.tag_dir} does not match the model: missing {len(missing)} tensor(s) "
            f"{missing[:8]}, unexpected {len(unexpected)} {unexpected[:8]}; pass load_module_strict=False to load "
            "the tensors that match"
        )


def _read_local(reader: CheckpointReader, src: str, kind: str, mt: model_view.ModelTensor, flat: tuple[int, int],
                dtype: torch.dtype) -> torch.Tensor:
    """Elements ``flat`` of this rank's local ``mt`` (1-D), gathered from its tensor-parallel boxes."""
    runs = mt.runs(flat)
    if len(runs) == 1 and runs[0][1].rows == 1:
        box, run = runs[0]
        return reader.read(src, kind, box=box, flat=run.box_range, dtype=dtype)
    out = torch.empty(flat[1] - flat[0], dtype=dtype)
    for box, run in runs:
        data = reader.read(src, kind, box=box, flat=run.box_range, dtype=dtype)
        model_view.run_view(out, run).copy_(data.view(run.rows, run.row_len))
    return out


def _load_managed(engine: Engine, reader: CheckpointReader, mt: model_view.ModelTensor, src: str, optim: bool) -> None:
    kind = reader.kind_of(src, WEIGHT_KINDS)
    saved_optim = [k for k in reader.tensors[src]["pieces"] if k.startswith("optim.")]
    for frag in engine.strategy.fragments(mt.tensor):
        flat = (frag.start, frag.end)
        target = frag.fp32 if frag.fp32 is not None else frag.model
        target.copy_(_read_local(reader, src, kind, mt, flat, target.dtype))
        if not optim or not saved_optim:
            continue
        for key, view in frag.state.items():
            if f"optim.{key}" not in saved_optim:
                raise CheckpointError(
                    f"the checkpoint has no optimizer state {key!r} for {mt.name} (it holds {saved_optim}; saved "
                    f"with {reader.manifest['optimizer']['type']}); use the same optimizer, or pass "
                    "load_optimizer_states=False"
                )
            view.copy_(_read_local(reader, src, f"optim.{key}", mt, flat, view.dtype))


def _load_full(reader: CheckpointReader, mt: model_view.ModelTensor, src: str) -> None:
    kind = reader.kind_of(src, _FULL_KINDS)
    value = _read_local(reader, src, kind, mt, (0, mt.tensor.numel()), mt.tensor.dtype)
    mt.tensor.data.copy_(value.view(mt.tensor.shape))


def _optimizer_wanted(engine: Engine, reader: CheckpointReader, requested: bool) -> bool:
    saved = reader.manifest.get("optimizer")
    if not requested or engine.strategy is None:
        return False
    if saved is None:
        logger.warning("checkpoint %s has no optimizer state; the optimizer starts fresh", reader.tag_dir)
        return False
    have = type(engine.strategy.optimizer.basic).__name__
    if saved["type"] != have:
        raise CheckpointError(f"the checkpoint's optimizer is {saved['type']}, this engine's is {have}; use the same "
                              "optimizer, or pass load_optimizer_states=False to load the weights only")
    return True


@torch.no_grad()
def load_model(engine: Engine, reader: CheckpointReader, view: model_view.ModelView, *, strict: bool, optimizer: bool,
               custom_load_fn: Callable | None = None) -> None:
    """Write weights (and optimizer state when ``optimizer``) of this rank's current layout. Local: no collectives.

    ``view`` is ``model_view.named_tensors(engine)``. Call :func:`finish` on every rank afterwards.
    """
    tensors, _, extra = view
    _check_names(reader, tensors, strict)
    if custom_load_fn is not None:
        _custom_load(engine, reader, tensors, custom_load_fn)
        return
    optim = _optimizer_wanted(engine, reader, optimizer)
    saved_opt = reader.manifest.get("optimizer") or {}
    basic = engine.strategy.optimizer.basic if optim else None
    if optim and any(g["state"] for g in saved_opt["groups"]):
        optim_state.materialize(basic)
    for mt in progress(tensors, f"loading {reader.tag_dir}"):
        src = reader.resolve(mt.name)
        if src is None:
            continue
        if mt.managed:
            _load_managed(engine, reader, mt, src, optim)
        else:
            _load_full(reader, mt, src)
    if optim:
        with _part(reader, "optimizer state"):
            optim_state.set_group_scalars(basic, saved_opt["groups"])
            optim_state.set_hyperparameters(basic, saved_opt["param_groups"], _fetcher(reader))
    saved_extra = reader.manifest.get("module_extra")
    if extra and saved_extra:
        with _part(reader, "module extra state"):
            engine.module.load_state_dict(codec.decode(saved_extra, _fetcher(reader)), strict=False)


@torch.no_grad()
def finish(engine: Engine) -> None:
    """Every rank, after :func:`load_model` succeeded everywhere: republish weights, drop stale gradients."""
    republish(engine)
    if engine.strategy is not None:
        engine.strategy.zero_grad()  # gradients accumulated before the load belong to other weights


def _custom_load(engine: Engine, reader: CheckpointReader, tensors: list[model_view.ModelTensor],
                 custom_load_fn: Callable) -> None:
    """DeepSpeed's ``custom_load_fn(src=state_dict, dst=module)``; then masters are refreshed from the module."""
    state = {}
    for mt in tensors:
        src = reader.resolve(mt.name)
        if src is not None:
            kind = reader.kind_of(src, WEIGHT_KINDS if mt.is_param else _FULL_KINDS)
            local = _read_local(reader, src, kind, mt, (0, mt.tensor.numel()), mt.tensor.dtype)
            state[mt.name] = local.view(mt.tensor.shape)
    custom_load_fn(src=state, dst=engine.module)
    for mt in tensors:
        if not mt.managed:
            continue
        for frag in engine.strategy.fragments(mt.tensor):
            if frag.fp32 is not None and frag.model is not None and frag.fp32.data_ptr() != frag.model.data_ptr():
                frag.fp32.copy_(frag.model)


def _restore_counters(engine: Engine, saved: dict) -> None:
    """Step counters; the micro-step count is re-expressed in this run's accumulation window if it changed."""
    for key in ("global_steps", "global_samples", "skipped_steps", "micro_steps"):
        setattr(engine, key, int(saved[key]))
    saved_gas, gas = int(saved.get("gradient_accumulation_steps", 0)), engine.gradient_accumulation_steps()
    if saved_gas and saved_gas != gas:
        if saved["micro_steps"] % saved_gas:
            logger.warning("the checkpoint was saved in the middle of an accumulation window (micro-step %d of "
                           "%d); resuming at the next window boundary", saved["micro_steps"] % saved_gas, saved_gas)
        engine.micro_steps = (int(saved["micro_steps"]) // saved_gas) * gas


def load_training_state(engine: Engine, reader: CheckpointReader, *, scheduler: bool, world_size: int,
                        rank: int) -> None:
    """Counters, loss scaler, LR scheduler (when ``scheduler``) and this rank's RNG states."""
    m = reader.manifest
    fetch = _fetcher(reader)
    with _part(reader, "step counters"):
        _restore_counters(engine, m["engine"])
    saved_scaler = m["scaler"]
    if saved_scaler["type"] == type(engine.scaler).__name__:
        with _part(reader, "loss scaler state"):
            engine.scaler.load_state_dict(codec.decode(saved_scaler["state"], fetch))
    else:
        logger.warning("loss scaler not restored: saved %s, this engine uses %s", saved_scaler["type"],
                       type(engine.scaler).__name__)
    sched = m.get("lr_scheduler")
    if scheduler and sched is not None and engine.lr_scheduler is not None:
        with _part(reader, "LR scheduler state"):
            engine.lr_scheduler.load_state_dict(codec.decode(sched.get("state"), fetch))
    data_state = m.get("data_efficiency")
    if data_state:
        with _part(reader, "data efficiency state"):
            engine.load_data_efficiency_state_dict(codec.decode(data_state, fetch))
    saved_world = m["layout"]["world_size"]
    if saved_world != world_size:
        logger.warning("RNG states not restored: saved by %d ranks, loading on %d (each rank keeps its own)",
                       saved_world, world_size)
        return
    entry = next((r for r in m["ranks"] if r["rank"] == rank), None)
    if entry is None or entry.get("rng") is None:
        raise CheckpointCorruptError(f"{reader.tag_dir}/manifest.json: no RNG state for rank {rank} although "
                                     f"{saved_world} ranks saved it; restore the manifest, or load an earlier tag")
    with _part(reader, f"RNG state of rank {rank}"):
        rng.restore(_fetcher(reader, entry["file"]), entry["rng"], lambda key: reader.has_entry(entry["file"], key))


def client_state(reader: CheckpointReader) -> dict:
    """The ``client_state`` dict passed to ``save_checkpoint``."""
    with _part(reader, "client_state"):
        return codec.decode(reader.manifest.get("client_state", {}), _fetcher(reader))
