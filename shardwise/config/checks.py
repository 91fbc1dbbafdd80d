"""Cross-field rules that DeepSpeed enforces (or fails on later, less clearly), checked on the typed sections.

Each rule returns Problems naming both keys, the values and the fix. Rules about what shardwise does not
implement are not here: they live in the one editable table of ``support.py``.
"""

from __future__ import annotations

from .errors import KIND_CONFLICT, KIND_TYPE, Problem, show
from .params import OPTIMIZER_RULES, SCHEDULER_RULES, check_params
from .schema import SectionsConfig
from .schema_data import data_efficiency_problems

# A dynamic loss scale above 2**127 is inf in float32: every step would overflow.
MAX_SCALE_POWER = 127


def _p(path: str, message: str) -> Problem:
    return Problem(path, message, KIND_CONFLICT)


def cross_checks(cfg: SectionsConfig) -> list[Problem]:
    """Every cross-field problem of ``cfg`` (empty list when consistent)."""
    problems = _precision_checks(cfg) + _loss_scale_checks(cfg) + _overflow_check(cfg) + _zero_checks(cfg)
    if cfg.optimizer is not None:
        problems += check_params("optimizer.params", cfg.optimizer.params, OPTIMIZER_RULES)
    if cfg.scheduler is not None:
        problems += check_params("scheduler.params", cfg.scheduler.params, SCHEDULER_RULES)
    problems += data_efficiency_problems(cfg.data_efficiency, cfg.curriculum_learning)
    if cfg.optimizer is not None and "max_grad_norm" in cfg.optimizer.params:
        value = cfg.optimizer.params["max_grad_norm"]
        problems.append(_p("optimizer.params.max_grad_norm",
                           f"optimizer.params.max_grad_norm = {show(value)}: gradient clipping is not an optimizer "
                           "parameter (DeepSpeed 0.19 refuses it too). Fix: remove max_grad_norm from "
                           f"optimizer.params and set the top-level \"gradient_clipping\": {show(value)}."))
    if cfg.tensor_parallel.autotp_size > 1 and cfg.zero_optimization.stage == 3:
        problems.append(_p("tensor_parallel.autotp_size",
                           f"tensor_parallel.autotp_size = {cfg.tensor_parallel.autotp_size} with "
                           "zero_optimization.stage 3: AutoTP training combines with ZeRO stages 0-2 only (as in "
                           "DeepSpeed). Fix: use zero_optimization.stage 1 or 2, or drop autotp_size."))
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
    if cfg.torch_autocast.enabled and cfg.zero_optimization.zero_quantized_weights:
        problems.append(_p("torch_autocast.enabled", "torch_autocast.enabled = true with "
                           "zero_optimization.zero_quantized_weights = true: quantized weight gathers cannot be "
                           "combined with autocast (DeepSpeed refuses this too). Fix: turn one of them off."))
    zero_only = (
        ("fp16.fp16_master_weights_and_grads", cfg.fp16.fp16_master_weights_and_grads),
        ("bf16.bf16_master_weights_and_grads", cfg.bf16.bf16_master_weights_and_grads),
        ("bf16.bf16_optimizer_states", cfg.bf16.bf16_optimizer_states),
    )
    for path, on in zero_only:
        if on and stage == 0:
            problems.append(_p(path, f"{path} = true needs zero_optimization.stage 1, 2 or 3 (stage is 0). "
                               f"Fix: enable ZeRO or set {path.split('.')[-1]} to false."))
    offload = cfg.zero_optimization.offload_optimizer_device
    for path, on, block in (("bf16.bf16_master_weights_and_grads", cfg.bf16.bf16_master_weights_and_grads, "bf16"),
                            ("bf16.bf16_optimizer_states", cfg.bf16.bf16_optimizer_states, "bf16"),
                            ("fp16.fp16_master_weights_and_grads", cfg.fp16.fp16_master_weights_and_grads, "fp16")):
        if on and not getattr(cfg, block).enabled:
            problems.append(_p(path, f"{path} = true with {block}.enabled = false: 16-bit master weights need "
                               f"the {block} model. Fix: set {block}.enabled to true, or {path} to false."))
        if on and offload == "nvme":
            problems.append(_p(path, f"{path} = true with zero_optimization.offload_optimizer.device \"nvme\" is "
                               "not supported yet by shardwise. Fix: offload to \"cpu\", or set it to false."))
        if on and block == "bf16" and cfg.data_types.grad_accum_dtype == "fp32":
            problems.append(_p(path, f"{path} = true with data_types.grad_accum_dtype = \"fp32\": the first keeps "
                               "gradients in bf16. Fix: remove data_types.grad_accum_dtype (or set it to false)."))
    lp_states_need_offload = (
        ("bf16.bf16_master_weights_and_grads", cfg.bf16.bf16_master_weights_and_grads
         and not cfg.bf16.bf16_optimizer_states, "bf16 master weights with fp32 optimizer states",
         " or also set bf16.bf16_optimizer_states = true"),
        ("fp16.fp16_master_weights_and_grads", cfg.fp16.fp16_master_weights_and_grads,
         "fp16 master weights with fp32 optimizer states", ""),
    )
    for path, on, what, alt in lp_states_need_offload:
        if on and stage > 0 and offload != "cpu":
            problems.append(_p(path, f"{path} = true keeps {what}, which needs ZeRO-Offload's CPU Adam (as in "
                               "DeepSpeed 0.19). Fix: set zero_optimization.offload_optimizer.device to \"cpu\""
                               f"{alt}."))
    if cfg.bf16.bf16_optimizer_states and not cfg.bf16.bf16_master_weights_and_grads:
        problems.append(_p("bf16.bf16_optimizer_states", "bf16.bf16_optimizer_states = true needs "
                           "bf16.bf16_master_weights_and_grads = true. Fix: enable both or neither."))
    return problems


def _loss_scale_checks(cfg: SectionsConfig) -> list[Problem]:
    """fp16 dynamic loss scaling (``loss_scale`` 0): the window and the floor must let the scale work. DeepSpeed 0.19
    refuses a window or floor <= 0 the same way; the ceiling and the floor above the start are shardwise's own."""
    fp16 = cfg.fp16
    if not fp16.enabled or fp16.loss_scale != 0:
        return []  # static scaling or no fp16: these values are not used (DeepSpeed accepts them too)
    problems = []
    why = "with dynamic loss scaling (fp16.enabled true, fp16.loss_scale 0)"
    if fp16.loss_scale_window < 1:
        problems.append(Problem("fp16.loss_scale_window", f"fp16.loss_scale_window = {fp16.loss_scale_window}: must "
                                f"be at least 1 {why}; the scale is raised after that many clean steps (DeepSpeed "
                                "0.19 refuses it too). Fix: remove it (default 1000) or set e.g. 1000.", KIND_TYPE))
    if fp16.min_loss_scale < 1:
        problems.append(Problem("fp16.min_loss_scale", f"fp16.min_loss_scale = {fp16.min_loss_scale}: must be at "
                                f"least 1 {why}; a floor of 0 lets the scale collapse and zero every gradient "
                                "(DeepSpeed 0.19 refuses it too). Fix: remove it (default 1).", KIND_TYPE))
    power = fp16.initial_scale_power
    if not 0 <= power <= MAX_SCALE_POWER:
        problems.append(Problem("fp16.initial_scale_power", f"fp16.initial_scale_power = {power}: expected 0 to "
                                f"{MAX_SCALE_POWER}; the scale starts at 2**{power}, and above 2**{MAX_SCALE_POWER} "
                                "every scaled loss is inf in float32. Fix: remove it (default 16) or set e.g. 16.",
                                KIND_TYPE))
    elif fp16.min_loss_scale > 2**power:
        problems.append(_p("fp16.min_loss_scale", f"fp16.min_loss_scale = {show(fp16.min_loss_scale)} is above the "
                           f"starting scale 2**fp16.initial_scale_power = 2**{power} = {2**power}: after the first "
                           "overflow the scale would jump up to the floor and overflow on every step. Fix: lower "
                           "min_loss_scale (default 1) or raise initial_scale_power."))
    return problems


def _overflow_check(cfg: SectionsConfig) -> list[Problem]:
    """The shardwise key ``check_grad_overflow`` against the precision blocks that decide it too."""
    value = cfg.check_grad_overflow
    if value is False and cfg.fp16.enabled:
        return [_p("check_grad_overflow", "check_grad_overflow = false with fp16.enabled: fp16 always skips steps "
                   "whose gradients overflow (that is how dynamic loss scaling finds its scale). Fix: remove "
                   "check_grad_overflow (it applies to fp32 and bf16 training).")]
    bf16 = cfg.bf16
    if value is not None and bf16.enabled and "check_grad_overflow" in bf16.model_fields_set and \
            bf16.check_grad_overflow != value:
        return [_p("check_grad_overflow", f"check_grad_overflow = {show(value)} but bf16.check_grad_overflow = "
                   f"{show(bf16.check_grad_overflow)}: both decide whether bf16 steps with inf/nan gradients are "
                   "skipped. Fix: keep only bf16.check_grad_overflow (DeepSpeed's key).")]
    return []


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
