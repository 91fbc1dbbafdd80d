"""The torch optimizer's own state, as checkpoints see it: per-group hyperparameters and scalars, and lazy state.

Per-element state (``exp_avg``, ``momentum_buffer``, ...) travels through the strategy's fragments. What is left is
per optimizer group: hyperparameters in ``param_groups`` (``lr``, ``betas``, ...) and scalar state entries (Adam's
``step``), identical for every tensor of a group because a group is stepped as one. Torch optimizers create state
on their first step, so a freshly built engine has none to load into: :func:`materialize` creates it with one
side-effect-free step (zero gradients, learning rate 0, parameters and existing state restored afterwards).
"""

from __future__ import annotations

from typing import Any

import torch

from shardwise.checkpoint import codec
from shardwise.checkpoint.errors import CheckpointError
from shardwise.checkpoint.files import dtype_from_name, dtype_name
from shardwise.common.logging import logger


def _held(basic: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    return [list(g["params"]) for g in basic.param_groups]


def _is_per_element(value: Any, held: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() >= 1 and value.numel() == held.numel()


def _encode_scalar(where: str, value: Any) -> dict:
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dim() > 1:
            raise CheckpointError(
                f"optimizer state {where} is a tensor of shape {tuple(value.shape)}: neither one value per element "
                "of the parameter nor a scalar, so it cannot be resharded; checkpointing this optimizer is not "
                "supported"
            )
        return {"tensor": value.item(), "dtype": dtype_name(value.dtype), "dim": value.dim()}
    if isinstance(value, (bool, int, float)) or value is None:
        return {"py": value}
    raise CheckpointError(f"optimizer state {where} is a {type(value).__name__}; only tensors and numbers are "
                          "supported in optimizer state")


def group_scalars(basic: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Per group: whether it has state yet, and its scalar entries (from the group's first tensor with state)."""
    out = []
    for gi, held in enumerate(_held(basic)):
        found: dict[str, dict] | None = None
        for t in held:
            state = basic.state.get(t, {})
            if not state:
                continue
            entry = {k: _encode_scalar(f"{k!r} of group {gi}", v) for k, v in state.items()
                     if not _is_per_element(v, t)}
            if found is None:
                found = entry
            elif entry != found:
                logger.warning("optimizer group %d: tensors disagree on scalar state (%s vs %s); saving the first",
                               gi, entry, found)
        out.append({"state": found is not None, "scalars": found or {}})
    return out


def _decode_scalar(saved: dict, current: Any) -> Any:
    if "py" in saved:
        return saved["py"]
    device = current.device if torch.is_tensor(current) else "cpu"
    value = torch.tensor(saved["tensor"], dtype=dtype_from_name(saved["dtype"]), device=device)
    return value.reshape(1) if saved.get("dim") == 1 else value


def set_group_scalars(basic: torch.optim.Optimizer, saved: list[dict[str, Any]]) -> None:
    """Restore :func:`group_scalars` output into every tensor of each group.

    A group saved before its first step gets no state, so its next step starts from scratch as it would have.
    """
    held = _held(basic)
    _check_groups(len(held), len(saved), "scalar state")
    for tensors, entry in zip(held, saved):
        for t in tensors:
            if not entry["state"]:
                basic.state.pop(t, None)
                continue
            state = basic.state[t]
            for key, value in entry["scalars"].items():
                state[key] = _decode_scalar(value, state.get(key))


def set_hyperparameters(basic: torch.optim.Optimizer, saved: list[dict], fetch: Any) -> None:
    """Restore :func:`hyperparameters` output into ``basic.param_groups``."""
    _check_groups(len(basic.param_groups), len(saved), "hyperparameters")
    for group, values in zip(basic.param_groups, saved):
        for key, value in codec.decode(values, fetch).items():
            current = group.get(key)
            if torch.is_tensor(current) and not torch.is_tensor(value):
                value = torch.as_tensor(value, dtype=current.dtype, device=current.device)
            group[key] = value


def _check_groups(have: int, saved: int, what: str) -> None:
    if have != saved:
        raise CheckpointError(
            f"the checkpoint's optimizer has {saved} parameter group(s), this engine's has {have} ({what}); build "
            "the optimizer with the same groups, or load with load_optimizer_states=False"
        )


def has_all_state(basic: torch.optim.Optimizer) -> bool:
    """Whether every tensor the optimizer steps already has its state."""
    return all(len(basic.state.get(t, {})) > 0 for held in _held(basic) for t in held)


@torch.no_grad()
def materialize(basic: torch.optim.Optimizer) -> None:
    """Create lazily-built optimizer state with a step that changes nothing the caller can observe.

    Gradients are zero and the learning rate is 0; the stepped tensors and any state that already existed are
    copied before and restored after, so optimizers whose zero-gradient step still moves weights (L2 weight decay)
    leave no trace. Costs one copy of this rank's optimizer-held tensors, once per load.
    """
    if has_all_state(basic):
        return
    held = [t for ts in _held(basic) for t in ts]
    values = [t.detach().clone() for t in held]
    grads = [t.grad for t in held]
    existing = {id(t): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in basic.state[t].items()}
                for t in held if basic.state.get(t)}
    lrs = [g["lr"] for g in basic.param_groups]
    try:
        for g in basic.param_groups:
            g["lr"] = torch.zeros_like(g["lr"]) if torch.is_tensor(g["lr"]) else 0.0
        for t in held:
            t.grad = torch.zeros_like(t)
        basic.step()
    finally:
        for g, lr in zip(basic.param_groups, lrs):
            g["lr"] = lr
        for t, v, gr in zip(held, values, grads):
            t.copy_(v)
            t.grad = gr
        for t in held:
            if id(t) in existing:
                basic.state[t].clear()
                basic.state[t].update(existing[id(t)])
