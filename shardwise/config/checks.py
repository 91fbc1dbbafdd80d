"""Cross-field rules that DeepSpeed enforces (or fails on later, less clearly), checked on the typed sections.

Each rule returns Problems naming both keys, the values and the fix. Rules about what shardwise does not
implement are not here: they live in the one editable table of ``support.py``.
"""

from __future__ import annotations

from .errors import KIND_CONFLICT, Problem, show
from .schema import SectionsConfig
from .schema_data import data_efficiency_problems


def _p(path: str, message: str) -> Problem:
    return Problem(path, message, KIND_CONFLICT)


def cross_checks(cfg: SectionsConfig) -> list[Problem]:
    """Every cross-field problem of ``cfg`` (empty list when consistent)."""
    problems = _precision_checks(cfg) + _zero_checks(cfg)
    problems += data_efficiency_problems(cfg.data_efficiency, cfg.curriculum_learning)
    if cfg.optimizer is not None and "max_grad_norm" in cfg.optimizer.params:
        value = cfg.optimizer.params["max_grad_norm"]
        problems.append(_p("optimizer.params.max_grad_norm",
                           f"optimizer.params.max_grad_norm = {show(value)}: gradient clipping is not an optimizer "
                           "parameter (DeepSpeed 0.19 refuses it too). Fix: remove max_grad_norm from "
                           f"optimizer.params and set the top-level \"gradient_clipping\": {show(value)}."))
    if cfg.gradient_allreduce_op == "sum" and cfg.zero_optimization.stage == 3:
        problems.append(_p("gradient_allreduce_op", "gradient_allreduce_op = \"sum\" is not supported with "
                           "zero_optimization.stage 3 (as in DeepSpeed). Fix: use \"mean\" or ZeRO stage 0-2."))
    return problems


def _precision_checks(cfg: SectionsConfig) -> list[Problem]:
    problems = []
    stage = cfg.zero_optimization.stage
    if cfg.fp16.enabled and cfg.bf16.enabled:
        problems.append(_p("fp16.enabled", "fp16.enabled and bf16.enabled are both true; only one mixed-precision "
                           "mode can be active. Fix: set one of them to false (bf16 needs no loss scaling)."))
    if cfg.amp.enabled and stage > 0:
        problems.append(_p("amp.enabled", f"amp.enabled = true with zero_optimization.stage = {stage}: apex AMP "
                           "cannot be combined with ZeRO (DeepSpeed refuses this too). Fix: use the \"bf16\" or "
                           "\"fp16\" block instead of \"amp\"."))
    zero_only = (
        ("fp16.fp16_master_weights_and_grads", cfg.fp16.fp16_master_weights_and_grads),
        ("bf16.bf16_master_weights_and_grads", cfg.bf16.bf16_master_weights_and_grads),
        ("bf16.bf16_optimizer_states", cfg.bf16.bf16_optimizer_states),
    )
    for path, on in zero_only:
        if on and stage == 0:
            problems.append(_p(path, f"{path} = true needs zero_optimization.stage 1, 2 or 3 (stage is 0). "
                               f"Fix: enable ZeRO or set {path.split('.')[-1]} to false."))
    if cfg.bf16.bf16_optimizer_states and not cfg.bf16.bf16_master_weights_and_grads:
        problems.append(_p("bf16.bf16_optimizer_states", "bf16.bf16_optimizer_states = true needs "
                           "bf16.bf16_master_weights_and_grads = true. Fix: enable both or neither."))
    return problems


def _zero_checks(cfg: SectionsConfig) -> list[Problem]:
    problems = []
    zero = cfg.zero_optimization
    opt, par = zero.offload_optimizer, zero.offload_param
    if opt is not None and opt.device != "none" and zero.stage == 0:
        problems.append(_p("zero_optimization.offload_optimizer.device",
                           f"zero_optimization.offload_optimizer.device = {show(opt.device)} needs "
                           "zero_optimization.stage 1, 2 or 3 (stage is 0). Fix: set a ZeRO stage or remove "
                           "offload_optimizer."))
    if opt is not None and opt.ratio < 1.0 and zero.stage != 3:
        problems.append(_p("zero_optimization.offload_optimizer.ratio",
                           f"zero_optimization.offload_optimizer.ratio = {opt.ratio:g} (partial offload) is only "
                           f"allowed with zero_optimization.stage 3 (stage is {zero.stage}). Fix: set ratio to "
                           "1.0 or use stage 3."))
    if par is not None and par.device != "none" and zero.stage != 3:
        problems.append(_p("zero_optimization.offload_param.device",
                           f"zero_optimization.offload_param.device = {show(par.device)} needs "
                           f"zero_optimization.stage 3 (stage is {zero.stage}): only ZeRO-3 partitions "
                           "parameters. Fix: use stage 3, or remove offload_param (offload_optimizer works with "
                           "stages 1-3)."))
    for name, block in (("offload_optimizer", opt), ("offload_param", par)):
        if block is not None and block.device == "nvme" and not block.nvme_path:
            problems.append(_p(f"zero_optimization.{name}.nvme_path",
                               f"zero_optimization.{name}.device = \"nvme\" but nvme_path is not set. Fix: add "
                               f"\"nvme_path\": \"/local_nvme\" (a directory on the NVMe drive) to {name}."))
    return problems
