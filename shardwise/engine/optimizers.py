"""Build the optimizer named in a DeepSpeed config (``"optimizer": {"type": ..., "params": {...}}``).

Owns the mapping from DeepSpeed's optimizer names to optimizer objects, with DeepSpeed 0.19's
semantics (``engine.py::_configure_basic_optimizer``):

* names are case-insensitive;
* ``Adam`` and ``AdamW`` take two extra keys: ``torch_adam`` (default false: build our
  ``FusedAdam``; true: ``torch.optim.Adam``/``AdamW``) and ``adam_w_mode`` (default **true**).
  ``Adam`` with the default ``adam_w_mode`` therefore decays weights the AdamW way; ``AdamW`` is
  always AdamW; only ``{"type": "Adam", "params": {"adam_w_mode": false}}`` gives L2 Adam;
* with ZeRO-Offload (``offload=True``) Adam/AdamW build :class:`~shardwise.ops.adam.CPUAdam`;
* ``Lamb``, ``Lion``, ``Adagrad``, ``SGD`` and DeepSpeed's ``MuAdam``/``MuAdamW``/``MuSGD`` (from
  the ``mup`` package) are built in; any other name is looked up in ``torch.optim``;
* ``Muon`` builds :class:`~shardwise.ops.muon.MuonWithAuxAdam` with DeepSpeed's split (Muon for 2-D hidden
  weights, AdamW for the rest; ``muon_lr`` / ``adam_lr`` override ``lr`` per side); it needs parameter names;
* ``max_grad_norm`` inside ``params`` is rejected: clipping is the top-level ``gradient_clipping``.

Torch optimizers are built with their fastest implementation (``fused=True``, else
``foreach=True``) unless the config chooses one: same update rule, several times faster on CPU
than torch's default per-tensor loop. Also here: :func:`is_zero_supported_optimizer` (which
optimizers are correct on flat ZeRO partitions) and :func:`describe_optimizer` (one log line).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable

import torch

from shardwise.ops.adam import CPUAdam, FusedAdam, backend_name
from shardwise.ops.lamb import Lamb
from shardwise.ops.lion import Lion

# DeepSpeed's spelling of the names it builds itself (plus SGD, which it reaches via torch.optim).
BUILTIN_NAMES = ("Adam", "AdamW", "Lamb", "Lion", "Adagrad", "SGD", "MuAdam", "MuAdamW", "MuSGD", "Muon")
REMOVED_NAMES = {"onebitadam": "OneBitAdam", "zerooneadam": "ZeroOneAdam", "onebitlamb": "OneBitLamb"}
ADAM_EXTRA_KEYS = ("torch_adam", "adam_w_mode")


def _torch_optimizers() -> dict[str, type]:
    """``torch.optim`` optimizer classes by lower-cased name."""
    found = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            found[name.lower()] = obj
    return found


def _suggest(word: str, candidates: Iterable[str]) -> str:
    candidates = list(candidates)
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" Did you mean '{by_lower[close[0]]}'?" if close else ""


def _accepted_keys(cls: type) -> tuple[list[str], bool]:
    """Constructor keyword names of an optimizer class, and whether it takes ``**kwargs``."""
    sig = inspect.signature(cls.__init__)
    names, var_kw = [], False
    for i, (name, prm) in enumerate(sig.parameters.items()):
        if prm.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
        elif i >= 2 and prm.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(name)  # i < 2 is (self, params)
    return names, var_kw


def _check_keys(display: str, cls: type, params: dict, *, reserved: Iterable[str] = (), extra=()) -> None:
    accepted, var_kw = _accepted_keys(cls)
    accepted = [k for k in accepted if k not in reserved] + list(extra)
    if var_kw:
        return
    for key in params:
        if key not in accepted:
            raise ValueError(
                f"optimizer '{display}' got unknown parameter '{key}'; accepted parameters: "
                f"{', '.join(accepted)}.{_suggest(key, accepted)}"
            )


def _build_torch(cls: type, model_params: list, params: dict) -> torch.optim.Optimizer:
    """Build a torch optimizer with ``fused=True`` or else ``foreach=True`` when the config is silent."""
    accepted, _ = _accepted_keys(cls)
    attempts = []
    if "fused" not in params and "foreach" not in params:
        if "fused" in accepted:
            attempts.append({"fused": True})
        if "foreach" in accepted:
            attempts.append({"foreach": True})
    attempts.append({})
    for i, fast in enumerate(attempts):
        try:
            return cls(model_params, **params, **fast)
        except (RuntimeError, ValueError, TypeError):
            if i == len(attempts) - 1:  # unsupported device/dtype for fused: try the next; else re-raise
                raise
    raise AssertionError("unreachable")


def _build_adam(key: str, params: dict, model_params: list, offload: bool) -> torch.optim.Optimizer:
    display = "AdamW" if key == "adamw" else "Adam"
    torch_adam = bool(params.pop("torch_adam", False))
    adam_w_mode = bool(params.pop("adam_w_mode", True))
    adamw = key == "adamw" or adam_w_mode  # DeepSpeed: Adam means AdamW unless adam_w_mode is false
    if torch_adam:
        cls = torch.optim.AdamW if adamw else torch.optim.Adam
        _check_keys(display, cls, params, extra=ADAM_EXTRA_KEYS)
        return _build_torch(cls, model_params, params)
    if offload:
        _check_keys(display, CPUAdam, params, reserved=("adamw_mode",), extra=ADAM_EXTRA_KEYS)
        return CPUAdam(model_params, **params, adamw_mode=adamw)
    _check_keys(display, FusedAdam, params, reserved=("adam_w_mode",), extra=ADAM_EXTRA_KEYS)
    return FusedAdam(model_params, **params, adam_w_mode=adamw)


def _build_mup(key: str, params: dict, model_params: list) -> torch.optim.Optimizer:
    name = {"muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD"}[key]
    try:
        import mup  # optional dependency, imported only when configured
    except ImportError as exc:
        raise ImportError(f"optimizer '{name}' needs the mup package: pip install mup") from exc
    cls = getattr(mup, name)
    _check_keys(name, cls, params)
    return cls(model_params, **params)


def _build_muon(params: dict, model_params: list, named_parameters: Iterable | None) -> torch.optim.Optimizer:
    from shardwise.ops.muon import MuonWithAuxAdam, split_params

    if named_parameters is None:
        raise ValueError("optimizer 'Muon' needs the model's parameter names to split Muon from AdamW parameters; "
                         "build it through initialize() (or pass a MuonWithAuxAdam as the client optimizer)")
    wanted = set()
    for item in model_params:
        wanted.update(id(p) for p in (item["params"] if isinstance(item, dict) else [item]))
    named = [(n, p) for n, p in named_parameters if id(p) in wanted]
    return MuonWithAuxAdam(split_params(named, params))


def build_optimizer(opt_type: str, params_cfg: dict | None, model_params: Iterable, *,
                    offload: bool = False, named_parameters: Iterable | None = None) -> torch.optim.Optimizer:
    """Build the optimizer a DeepSpeed config names.

    Args:
        opt_type: the config's ``optimizer.type`` (case-insensitive), e.g. ``"AdamW"``.
        params_cfg: the config's ``optimizer.params`` (``lr``, ``betas``, ...); may be None.
        model_params: tensors or param-group dicts, as torch optimizers take.
        offload: ZeRO-Offload is on (optimizer state in CPU memory): Adam/AdamW become ``CPUAdam``.
        named_parameters: ``(name, parameter)`` pairs of the model (``Muon`` splits its groups by name).

    Raises:
        ValueError: unknown or removed optimizer name, unknown parameter key, ``max_grad_norm``.
    """
    params = dict(params_cfg or {})
    key = str(opt_type).strip().lower()
    if "max_grad_norm" in params:
        raise ValueError("'max_grad_norm' is not supported as an optimizer parameter; remove it and set the "
                         "top-level 'gradient_clipping' key instead (e.g. \"gradient_clipping\": 1.0)")
    if key in REMOVED_NAMES:
        raise ValueError(f"optimizer '{opt_type}' ({REMOVED_NAMES[key]}) was removed in DeepSpeed 0.19 and is not "
                         "supported; use \"Adam\" or \"AdamW\"")
    model_params = list(model_params)  # may be a generator; fused/foreach fallbacks need it twice
    if key in ("adam", "adamw"):
        return _build_adam(key, params, model_params, offload)
    if key in ("muadam", "muadamw", "musgd"):
        return _build_mup(key, params, model_params)
    if key == "muon":
        if offload:
            raise ValueError("optimizer 'Muon' with zero_optimization.offload_optimizer is not supported (as in "
                             "DeepSpeed 0.19); remove offload_optimizer, or use \"AdamW\" with offload")
        return _build_muon(params, model_params, named_parameters)
    ours = {"lamb": (Lamb, "Lamb"), "lion": (Lion, "Lion")}
    if key in ours:
        cls, display = ours[key]
        _check_keys(display, cls, params)
        return cls(model_params, **params)
    torch_classes = _torch_optimizers()
    if key in torch_classes:
        cls = torch_classes[key]
        _check_keys(cls.__name__, cls, params)
        return _build_torch(cls, model_params, params)
    torch_names = sorted(c.__name__ for c in torch_classes.values())
    raise ValueError(
        f"unknown optimizer type '{opt_type}'. Supported: {', '.join(BUILTIN_NAMES)}, or any torch.optim "
        f"class ({', '.join(torch_names)}).{_suggest(key, list(BUILTIN_NAMES) + torch_names)}"
    )


# [Note: elementwise optimizers and ZeRO]
# ZeRO flattens parameters into one buffer and gives each rank a contiguous slice, which can start
# and end in the middle of a tensor. An optimizer is correct on such a slice only if each element's
# update depends on that element alone (plus scalars such as the step count): then updating the
# slice equals updating the whole tensors and slicing. Adam, SGD, Adagrad, Lion... qualify.
# LAMB and LARS do not: their trust ratio ||p|| / ||update|| is a norm over each whole parameter
# tensor, which no rank sees. Adafactor (row/column statistics of 2-D weights), LBFGS (dot products
# over all parameters) and Muon (matrix orthogonalisation) fail for the same reason.
_ELEMENTWISE = {
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adadelta,
    torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Rprop,
    torch.optim.ASGD, CPUAdam, FusedAdam, Lion,
}


def is_zero_supported_optimizer(opt: torch.optim.Optimizer) -> bool:
    """True if ``opt``'s update is elementwise, hence correct on flat ZeRO partitions, or if it is
    ``MuonWithAuxAdam``, which gathers whole matrices itself ([Note: Muon on flat partitions]).

    Matches the exact class (a subclass may change the update). See [Note: elementwise optimizers
    and ZeRO]; other optimizers need ``zero_allow_untested_optimizer: true``.
    """
    from shardwise.ops.muon import MuonWithAuxAdam

    return type(opt) in _ELEMENTWISE or type(opt) is MuonWithAuxAdam


_DESCRIBED_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov", "bias_correction",
                   "max_coeff", "min_coeff", "fused", "foreach")


def describe_optimizer(opt: torch.optim.Optimizer) -> str:
    """One line for the log: class, implementation, sizes and the first group's hyperparameters."""
    groups = opt.param_groups
    tensors = [p for g in groups for p in g["params"]]
    parts = [f"{len(groups)} group(s)", f"{len(tensors)} tensors", f"{sum(p.numel() for p in tensors):,} elements"]
    if isinstance(opt, CPUAdam):
        parts.insert(0, f"adamw_mode={opt.adam_w_mode}, backend={backend_name()}")
    elif isinstance(opt, FusedAdam):
        parts.insert(0, f"adamw_mode={opt.adam_w_mode}")
    first = groups[0] if groups else {}
    for k in _DESCRIBED_KEYS:
        if k in first and first[k] is not None:
            parts.append(f"{k}={first[k]}")
    return f"{type(opt).__name__}({', '.join(parts)})"


__all__ = ["build_optimizer", "describe_optimizer", "is_zero_supported_optimizer"]
