"""Muon (MomentUm Orthogonalized by Newton-Schulz) with an auxiliary AdamW: DeepSpeed 0.19's ``"type": "Muon"``.

``MuonWithAuxAdam`` (DeepSpeed's class name) holds two kinds of parameter groups, told apart by ``use_muon``:

* Muon groups (2-D hidden weights): ``buf = lerp(buf, g, 1 - momentum)``; the update direction is
  ``lerp(g, buf, momentum)`` (Nesterov, default) or ``buf``; it is orthogonalised by a Newton-Schulz iteration
  (``ns_steps``, coefficients ``ns_coefficients``) and applied as ``p *= 1 - lr*wd; p -= lr * ratio * O`` with
  ``ratio = sqrt(max(1, rows/cols))`` (``adjust_lr_fn`` "original", as torch.optim.Muon and DeepSpeed) or
  ``0.2 * sqrt(max(rows, cols))`` ("match_rms_adamw"). Weights of more than two dimensions are viewed as
  ``(shape[0], -1)``. This is torch.optim.Muon's algorithm; ``ns_dtype="bf16"`` with ``ns_method="standard"``
  reproduces torch.optim.Muon exactly (it always iterates in bf16).
* AdamW groups (everything else): torch.optim.AdamW's update (``torch.optim.adamw.adamw``).

Under ZeRO the optimizer steps flat partitions, while Newton-Schulz needs each weight's whole matrix. The momentum
and the Nesterov blend are elementwise, so each rank keeps them for its own partition only (state is still 1/world);
only the blended direction is all-gathered, each weight's matrix is orthogonalised by the ranks that hold part of
it, and each rank applies its slice. ``bind_partitions(strategy)`` (called by the engine after ZeRO wraps the
optimizer) tells the optimizer where each weight's pieces lie, through the strategy's ``fragments`` API; see
``muon_partition.py``. The result equals single-process Muon on the same gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as _adamw

from shardwise.ops.muon_partition import FlatMuonGroup
from shardwise.ops.newton_schulz import (
    NS_COEFFICIENTS,
    NS_DTYPES,
    NS_METHODS,
    lr_ratio,
    muon_direction,
    orthogonalize,
)

if TYPE_CHECKING:
    from shardwise.engine.strategy import ShardingStrategy


MUON_DEFAULTS = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.0, "nesterov": True, "ns_steps": 5,
                 "ns_method": "gram", "ns_coefficients": NS_COEFFICIENTS, "adjust_lr_fn": None, "ns_dtype": "auto"}
ADAM_DEFAULTS = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-10, "weight_decay": 0.0}


class MuonWithAuxAdam(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True``, AdamW for the others (see the module docstring)."""

    def __init__(self, param_groups: Iterable[dict[str, Any]]) -> None:
        groups = []
        for g in param_groups:
            if "use_muon" not in g:
                raise ValueError("MuonWithAuxAdam: every parameter group needs a 'use_muon' flag (True: Muon, "
                                 "False: AdamW)")
            defaults = MUON_DEFAULTS if g["use_muon"] else ADAM_DEFAULTS
            group = {**defaults, **g, "params": list(g["params"])}
            if g["use_muon"]:
                _check_muon_group(group)
            groups.append(group)
        super().__init__(groups, {})
        # the Muon weights and their full shapes, kept for bind_partitions (ZeRO replaces the group's tensors)
        self._members: dict[int, list[Tensor]] = {i: list(g["params"]) for i, g in enumerate(self.param_groups)
                                                  if g["use_muon"]}
        self._shapes = {i: [full_shape(p) for p in ps] for i, ps in self._members.items()}
        self._partitions: dict[int, Any] = {}  # group index -> muon_partition.FlatMuonGroup once bound

    def bind_partitions(self, strategy: ShardingStrategy) -> None:
        """Learn, from a ZeRO strategy's ``fragments``, which pieces of which weights this rank's flat Muon
        partitions hold (a collective over the strategy's ``state_group``); the engine calls it after wrapping."""
        if strategy.policy.offload_optimizer:
            raise ValueError("Muon with zero_optimization.offload_optimizer is not supported (as in DeepSpeed 0.19); "
                             "remove offload_optimizer")
        for i, members in self._members.items():
            flats = [p for p in self.param_groups[i]["params"] if not any(p is m for m in members)]
            if len(flats) > 1:
                raise RuntimeError(f"Muon group {i} was flattened into {len(flats)} tensors; expected one")
            self._partitions[i] = FlatMuonGroup(flats[0], members, self._shapes[i], strategy) if flats else None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Muon / AdamW step over every group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            if group["use_muon"]:
                self._muon_step(i, group)
            else:
                self._adam_step(group)
        return loss

    def _muon_step(self, index: int, group: dict[str, Any]) -> None:
        flat = self._partitions.get(index)
        for p in group["params"]:
            if p.grad is None and flat is None:
                continue
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - group["momentum"])
            update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf.clone()
            if flat is not None:  # a ZeRO partition: ratios are folded into the directions, piece by piece
                direction, ratio = flat.directions(update.reshape(-1), group).view_as(p), 1.0
            else:
                direction, ratio = muon_direction(update, p.shape, group)
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(direction.view_as(p), alpha=-group["lr"] * ratio)

    def _adam_step(self, group: dict[str, Any]) -> None:
        params, grads, avgs, sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            _adamw(params, grads, avgs, sqs, [], steps, foreach=False, amsgrad=False, beta1=beta1, beta2=beta2,
                   lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def full_shape(p: Tensor) -> torch.Size:
    """A parameter's real shape, also while ZeRO-3 or ``zero.Init`` holds only a shard of it."""
    shape = getattr(p, "_sw_init_shape", None) if hasattr(p, "_sw_init_shard") else None
    if shape is None:
        shape = getattr(p, "ds_shape", None)  # DeepSpeed's parameter API: ZeRO-3 parameters' full shape
    return torch.Size(shape if shape is not None else p.shape)


def _check_muon_group(group: dict[str, Any]) -> None:
    if group["ns_method"] not in NS_METHODS:
        raise ValueError(f"Muon ns_method {group['ns_method']!r}: expected one of {', '.join(NS_METHODS)}")
    if group["ns_dtype"] != "auto" and group["ns_dtype"] not in NS_DTYPES:
        raise ValueError(f"Muon ns_dtype {group['ns_dtype']!r}: expected \"auto\" or one of {', '.join(NS_DTYPES)}")
    if group["adjust_lr_fn"] not in (None, "original", "match_rms_adamw"):
        raise ValueError(f"Muon adjust_lr_fn {group['adjust_lr_fn']!r}: expected null, \"original\" or "
                         "\"match_rms_adamw\"")
    for p in group["params"]:
        if len(full_shape(p)) < 2:
            raise ValueError(f"Muon orthogonalises matrices; a parameter of shape {tuple(p.shape)} has use_muon "
                             "True. Fix: set p.use_muon = False for it (AdamW then updates it)")


# -- DeepSpeed's parameter split and config keys ------------------------------------------------------------------
MUON_KEYS = ("lr", "muon_lr", "momentum", "weight_decay", "ns_method", "nesterov", "ns_steps", "ns_coefficients",
             "adjust_lr_fn", "ns_dtype")
ADAM_KEYS = ("lr", "adam_lr", "betas", "eps", "weight_decay")


def default_use_muon(name: str, param: nn.Parameter) -> bool:
    """DeepSpeed's rule: Muon for weights of 2 or more dimensions whose name mentions neither "embed" nor
    "lm_head"; AdamW for the rest (biases, norms, embeddings, the output head)."""
    return len(full_shape(param)) >= 2 and not any(k in name.lower() for k in ("embed", "lm_head"))


def split_params(named_params: Iterable[tuple[str, nn.Parameter]], params_cfg: dict[str, Any]
                 ) -> list[dict[str, Any]]:
    """DeepSpeed's two groups from the config's ``optimizer.params``; a ``use_muon`` attribute the script set on a
    parameter is kept, others get ``default_use_muon`` (and the attribute, as DeepSpeed sets it)."""
    import difflib

    for key in params_cfg:
        if key not in MUON_KEYS + ADAM_KEYS:
            close = difflib.get_close_matches(key, MUON_KEYS + ADAM_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"optimizer 'Muon' got unknown parameter '{key}'; accepted parameters: "
                             f"{', '.join(dict.fromkeys(MUON_KEYS + ADAM_KEYS))}.{hint}")
    muon, adam = [], []
    for name, p in named_params:
        if not hasattr(p, "use_muon"):
            p.use_muon = default_use_muon(name, p)
        if p.requires_grad:
            (muon if p.use_muon else adam).append(p)
    groups = []
    if muon:
        opts = {k: params_cfg[k] for k in MUON_KEYS if k in params_cfg and k not in ("lr", "muon_lr")}
        lr = params_cfg.get("muon_lr", params_cfg.get("lr"))
        groups.append({"params": muon, "use_muon": True, "name": "muon-params", **opts,
                       **({"lr": lr} if lr is not None else {})})
    if adam:
        opts = {k: params_cfg[k] for k in ADAM_KEYS if k in params_cfg and k not in ("lr", "adam_lr")}
        if "betas" in opts:
            opts["betas"] = tuple(opts["betas"])
        lr = params_cfg.get("adam_lr", params_cfg.get("lr"))
        groups.append({"params": adam, "use_muon": False, "name": "adam-params", **opts,
                       **({"lr": lr} if lr is not None else {})})
    if not groups:
        raise ValueError("optimizer 'Muon': the model has no trainable parameter")
    return groups


__all__ = ["MuonWithAuxAdam", "default_use_muon", "lr_ratio", "muon_direction", "orthogonalize", "split_params"]
