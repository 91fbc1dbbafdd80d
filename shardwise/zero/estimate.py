"""Memory needed for model states (parameters, gradients, fp32 master weights, optimizer states) per rank.

``estimate_model_states`` predicts what ``engine.memory_breakdown()`` reports, for a model size, a data-parallel
size, a ZeRO stage, a precision and an offload choice, from the engine's own storage rules (``zero/policy.py``):

==========================  ==============  ===========================  ==============  ==================
layout (P params, N ranks)  parameters      gradients                    fp32 master     optimizer state
==========================  ==============  ===========================  ==============  ==================
stage 0, fp32               4P              4P                           none            kP
stage 0, fp16 / bf16        2P              2P                           4P              kP
stage 0, bf16 + fp32 accum  2P              4P + 4P/N (fp32)             4P/N            kP/N   (BF16 optimizer)
stage 1                     bP              aP + aP/N                    4P/N            kP/N
stage 2                     bP              aP/N                         4P/N            kP/N
stage 3                     bP/N (+ hpZ)    aP/N                         4P/N            kP/N
==========================  ==============  ===========================  ==============  ==================

``b`` is the model dtype's size (4 fp32, 2 bf16/fp16), ``a`` the gradient-accumulation dtype's
(``data_types.grad_accum_dtype``, default: the model dtype), ``k`` the optimizer's state bytes per element (Adam 8).
16-bit master weights (``low_precision_master``: ``bf16.bf16_master_weights_and_grads`` /
``fp16.fp16_master_weights_and_grads``, stages 1-3) make the master ``bP/N`` and ``a = b``; 16-bit optimizer states
(``low_precision_optimizer_states``: ``bf16.bf16_optimizer_states``) halve ``k``.
Stage 1 keeps a full gradient accumulation buffer plus the reduced partition; stage 2 keeps only the partition.
In fp32 without optimizer offload, stage 3 and (with one data-parallel rank: AutoTP or pipeline stages without
data parallelism) stages 1-2 step the parameters' own shards or buffer: no master copy (master 0).
With ``offload_optimizer`` the master weights and optimizer state are on the host; with ZeRO-3 ``offload_param``
the parameter partition is too, and the device holds only the gathered working set. hpZ
(``zero_hpz_partition_size`` h > 1) adds a secondary copy of the 16-bit parameters partitioned over h ranks.
Padding (at most ``N * 16`` elements per bucket) and transient buffers (gathered layers, bucket staging) are not
model states: ``ModelStatesEstimate.working`` reports the ZeRO-3 working set separately.

DeepSpeed's helpers keep their names and signatures (``estimate_zero2_model_states_mem_needs_all_live`` /
``_all_cold`` and the ZeRO-3 ones) but answer with shardwise's storage, which differs from DeepSpeed's own
(e.g. ZeRO-2 keeps no fp32 gradient partition between steps). ``main`` is the ``shardwise-estimate`` command.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from shardwise.config import dtypes

#: optimizer state bytes per parameter element (fp32 state tensors)
OPTIMIZER_STATE_BYTES = {"adam": 8, "adamw": 8, "lamb": 8, "adagrad": 4, "lion": 4, "sgd": 4, "sgd-nomomentum": 0}
_GB = 2**30


@dataclass(frozen=True)
class ModelStatesEstimate:
    """Bytes per rank, by kind; ``host`` is what offload moves off the device (already excluded from the rest)."""

    parameters: int
    gradients: int
    master_weights: int
    optimizer_states: int
    host: int
    working: int = 0  # ZeRO-3: gathered parameters in flight (largest layer), not a model state

    @property
    def device_total(self) -> int:
        """Model-state bytes on the accelerator (what ``engine.memory_breakdown()`` sums, offload excluded)."""
        return self.parameters + self.gradients + self.master_weights + self.optimizer_states

    @property
    def total(self) -> int:
        """Model-state bytes per rank, wherever they live."""
        return self.device_total + self.host


def _bytes_of(dtype: str | None, name: str) -> int:
    if dtype not in dtypes.SPELLINGS:
        raise ValueError(f"{name} = {dtype!r}: expected one of {sorted(dtypes.SPELLINGS)}")
    return dtypes.ITEMSIZE[dtype]


def _state_bytes(optimizer: str | int) -> int:
    if isinstance(optimizer, int):
        return optimizer
    key = optimizer.lower()
    if key not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer = {optimizer!r}: expected one of {sorted(OPTIMIZER_STATE_BYTES)} or the number "
                         "of state bytes per parameter")
    return OPTIMIZER_STATE_BYTES[key]


def estimate_model_states(total_params: int, world_size: int, stage: int, precision: str = "bf16", *,
                          optimizer: str | int = "adam", offload_optimizer: bool = False,
                          offload_param: bool = False, grad_accum_dtype: str | None = None,
                          hpz_partition_size: int = 1, largest_layer_params: int = 0,
                          low_precision_master: bool = False,
                          low_precision_optimizer_states: bool = False) -> ModelStatesEstimate:
    """Per-rank model-state bytes of shardwise for this layout (see the module docstring for the formulas)."""
    if (low_precision_master or low_precision_optimizer_states) and (stage == 0 or precision == "fp32"):
        raise ValueError(f"16-bit master weights / optimizer states need stage 1-3 and a 16-bit precision "
                         f"(got stage {stage}, {precision})")
    if low_precision_optimizer_states and not low_precision_master:
        raise ValueError("low_precision_optimizer_states needs low_precision_master (bf16.bf16_optimizer_states "
                         "needs bf16.bf16_master_weights_and_grads)")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage = {stage}: expected 0, 1, 2 or 3")
    if total_params < 0 or world_size < 1:
        raise ValueError(f"total_params ({total_params}) must be >= 0 and world_size ({world_size}) >= 1")
    if offload_param and stage != 3:
        raise ValueError(f"offload_param needs stage 3, got stage {stage}")
    p, n = total_params, world_size
    b = _bytes_of(precision, "precision")
    k = _state_bytes(optimizer)
    bf16_optimizer = precision == "bf16" and stage == 0 and grad_accum_dtype == "fp32"
    a = _bytes_of(grad_accum_dtype or precision, "grad_accum_dtype")
    if low_precision_master:
        a = b
    if low_precision_optimizer_states:
        k //= 2
    m = b if low_precision_master else 4  # master bytes per element
    working = 0
    if stage == 0 and not bf16_optimizer:
        master = 0 if precision == "fp32" and not offload_optimizer else 4 * p
        params, grads, state = b * p, a * p, k * p
    elif stage == 0:  # the BF16 optimizer: ZeRO-1 layout with fp32 accumulation
        params, grads, master, state = b * p, a * p + a * p // n, 4 * p // n, k * p // n
    elif stage == 1:
        params, grads, master, state = b * p, a * p + a * p // n, m * p // n, k * p // n
    elif stage == 2:
        params, grads, master, state = b * p, a * p // n, m * p // n, k * p // n
    else:
        params, grads, master, state = b * p // n, a * p // n, m * p // n, k * p // n
        if 1 < hpz_partition_size < n:
            params += b * p // hpz_partition_size
        working = b * largest_layer_params
    if precision == "fp32" and not offload_optimizer and (stage == 3 or (stage in (1, 2) and n == 1)):
        master = 0  # fp32 shards (stage 3) or one rank's whole fp32 buffer: the optimizer steps them in place
    host = 0
    if offload_optimizer:
        host += master + state
        master = state = 0
    if offload_param:
        host += params
        params = 0
    return ModelStatesEstimate(params, grads, master, state, host, working)


# -- DeepSpeed's helpers ------------------------------------------------------------------------------------------
def model_to_params(model: nn.Module) -> int:
    """Distinct parameter elements of ``model`` (tied weights counted once)."""
    return sum({id(p): p.numel() for p in model.parameters()}.values())


def largest_layer_params(model: nn.Module) -> int:
    """Elements of the largest module's own parameters (what ZeRO-3 gathers at once, at least)."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def _node_host_bytes(est: ModelStatesEstimate, total_params: int, num_gpus_per_node: int, model_on_host: bool,
                     additional_buffer_factor: float) -> int:
    # Each rank's process builds the model on the host (fp32) before placing it, unless zero.Init partitions it.
    per_rank = est.host + (4 * total_params if model_on_host else 0)
    return int(per_rank * num_gpus_per_node * additional_buffer_factor)


def estimate_zero2_model_states_mem_needs(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                          cpu_offload: bool = True,
                                          additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    """``(host bytes per node, device bytes per rank)`` for 16-bit ZeRO-2 training with Adam (DeepSpeed's shape)."""
    est = estimate_model_states(total_params, num_gpus_per_node * num_nodes, 2, "bf16",
                                offload_optimizer=cpu_offload)
    host = _node_host_bytes(est, total_params, num_gpus_per_node, True, additional_buffer_factor)
    return host, est.device_total


def estimate_zero3_model_states_mem_needs(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                                          num_nodes: int = 1, cpu_offload: bool = True,
                                          cpu_offload_params: bool = True, zero_init: bool = True,
                                          additional_buffer_factor: float = 1.5) -> tuple[int, int, int]:
    """``(host bytes per node, device bytes per rank, largest layer bytes)`` for 16-bit ZeRO-3 with Adam."""
    est = estimate_model_states(total_params, num_gpus_per_node * num_nodes, 3, "bf16",
                                offload_optimizer=cpu_offload, offload_param=cpu_offload and cpu_offload_params,
                                largest_layer_params=largest_layer_params)
    host = _node_host_bytes(est, total_params, num_gpus_per_node, not zero_init, additional_buffer_factor)
    return host, est.device_total + est.working, est.working


def _header(total_params: int, num_gpus_per_node: int, num_nodes: int, extra: str = "") -> str:
    nodes = "nodes" if num_nodes > 1 else "node"
    return ("Estimated memory needed for params, optim states and gradients (shardwise, 16-bit + Adam) for a:\n"
            f"HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} accelerator(s) per node.\n"
            f"SW: Model with {total_params / 1e6:.0f}M total params{extra}.\n"
            "  per CPU  |  per GPU |   Options")


def estimate_zero2_model_states_mem_needs_all_cold(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5) -> None:
    """Print the ZeRO-2 estimate for a hypothetical model of ``total_params`` parameters, with and without offload."""
    print(_header(total_params, num_gpus_per_node, num_nodes))
    for offload in (True, False):
        host, dev = estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node, num_nodes, offload,
                                                          additional_buffer_factor)
        print(f" {host / _GB:7.2f}GB | {dev / _GB:6.2f}GB | offload_optimizer={'cpu ' if offload else 'none'}")


def estimate_zero2_model_states_mem_needs_all_live(model: nn.Module, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5) -> None:
    """Print the ZeRO-2 estimate for an actual ``model``."""
    estimate_zero2_model_states_mem_needs_all_cold(model_to_params(model), num_gpus_per_node, num_nodes,
                                                   additional_buffer_factor)


def estimate_zero3_model_states_mem_needs_all_cold(total_params: int, largest_layer_params: int,
                                                   num_gpus_per_node: int = 1, num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5) -> None:
    """Print the ZeRO-3 estimate for a hypothetical model, for each offload / zero.Init combination."""
    print(_header(total_params, num_gpus_per_node, num_nodes,
                  f", {largest_layer_params / 1e6:.0f}M largest layer params"))
    for offload in (True, False):
        for offload_params in (True, False):
            if offload_params and not offload:
                continue
            for zero_init in (True, False):
                host, dev, _ = estimate_zero3_model_states_mem_needs(
                    total_params, largest_layer_params, num_gpus_per_node, num_nodes, offload, offload_params,
                    zero_init, additional_buffer_factor)
                print(f" {host / _GB:7.2f}GB | {dev / _GB:6.2f}GB | "
                      f"offload_param={'cpu ' if offload_params else 'none'}, "
                      f"offload_optimizer={'cpu ' if offload else 'none'}, zero_init={int(zero_init)}")


def estimate_zero3_model_states_mem_needs_all_live(model: nn.Module, num_gpus_per_node: int = 1, num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5) -> None:
    """Print the ZeRO-3 estimate for an actual ``model``."""
    estimate_zero3_model_states_mem_needs_all_cold(model_to_params(model), largest_layer_params(model),
                                                   num_gpus_per_node, num_nodes, additional_buffer_factor)


# -- the shardwise-estimate command ------------------------------------------------------------------------------
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> int:
    """``"7B"``, ``"350M"``, ``"1.3e9"``, ``"125000"`` -> an integer count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", str(text).lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count; write e.g. 7B, 350M, 1.3e9 or 125000")
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])


def _layout_from_config(path: str, world: int) -> dict:
    """Stage, precision and offload read from a ds_config.json (through the config package)."""
    from shardwise.config import load_config, read_config_dict

    raw = read_config_dict(path)
    if not any(k in raw for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        raw["train_micro_batch_size_per_gpu"] = 1  # batch keys do not matter for memory
    cfg = load_config(raw, dp_world_size=world, log=False)
    zc = cfg.zero_optimization
    precision = "bf16" if cfg.bf16.enabled else "fp16" if cfg.fp16.enabled else "fp32"
    opt = cfg.optimizer.type.lower() if cfg.optimizer is not None else "adam"
    return {"stages": [zc.stage], "precisions": [precision], "optimizer": opt if opt in OPTIMIZER_STATE_BYTES else
            "adam", "offload_optimizer": [zc.offload_optimizer_device != "none"],
            "offload_param": zc.offload_param_device != "none", "grad_accum_dtype": cfg.data_types.grad_accum_dtype,
            "hpz": int(zc.zero_hpz_partition_size or 1),
            "lp_master": bool((cfg.bf16.enabled and cfg.bf16.bf16_master_weights_and_grads)
                              or (cfg.fp16.enabled and cfg.fp16.fp16_master_weights_and_grads)),
            "lp_states": bool(cfg.bf16.enabled and cfg.bf16.bf16_optimizer_states)}


def _low_precision(layout: dict, stage: int, precision: str) -> dict[str, bool]:
    """The 16-bit master/state options where they apply (stages 1-3, 16-bit precisions; off elsewhere)."""
    applies = stage > 0 and precision != "fp32"
    return {"low_precision_master": applies and layout["lp_master"],
            "low_precision_optimizer_states": applies and layout["lp_master"] and layout["lp_states"]}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shardwise-estimate", description="Per-rank memory for model states "
                                 "(parameters, gradients, fp32 master weights, optimizer states) under ZeRO.")
    ap.add_argument("--params", type=parse_count, required=True, help="model parameters, e.g. 7B, 350M, 1.3e9")
    ap.add_argument("--largest_layer", type=parse_count, default=0, help="largest layer's parameters (ZeRO-3)")
    ap.add_argument("--num_gpus", "--num_gpus_per_node", dest="gpus", type=int, default=1,
                    help="ranks per node (default 1)")
    ap.add_argument("--num_nodes", type=int, default=1, help="nodes (default 1)")
    ap.add_argument("--stage", choices=["0", "1", "2", "3", "all"], default="all")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16", "all"], default="bf16")
    ap.add_argument("--optimizer", default="adam", help="adam, adamw, lamb, adagrad, lion, sgd or state bytes")
    ap.add_argument("--offload_optimizer", choices=["none", "cpu", "both"], default="both")
    ap.add_argument("--offload_param", action="store_true", help="ZeRO-3 parameter offload")
    ap.add_argument("--grad_accum_dtype", choices=["fp32", "bf16", "fp16"], default=None)
    ap.add_argument("--hpz", type=int, default=1, help="zero_hpz_partition_size (ZeRO-3)")
    ap.add_argument("--low_precision_master", action="store_true",
                    help="16-bit master weights and gradients (bf16_master_weights_and_grads; stages 1-3)")
    ap.add_argument("--low_precision_optimizer_states", action="store_true",
                    help="16-bit optimizer states (bf16_optimizer_states; needs --low_precision_master)")
    ap.add_argument("--config", help="read stage, precision, offload and optimizer from this ds_config.json")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``shardwise-estimate``: print per-rank model-state memory for each layout asked for."""
    args = _parser().parse_args(argv)
    world = args.gpus * args.num_nodes
    opt = int(args.optimizer) if args.optimizer.isdigit() else args.optimizer
    layout = {"stages": [0, 1, 2, 3] if args.stage == "all" else [int(args.stage)],
              "precisions": ["fp32", "bf16", "fp16"] if args.precision == "all" else [args.precision],
              "optimizer": opt, "offload_optimizer": {"none": [False], "cpu": [True], "both": [False, True]}[
                  args.offload_optimizer], "offload_param": args.offload_param,
              "grad_accum_dtype": args.grad_accum_dtype, "hpz": args.hpz, "lp_master": args.low_precision_master,
              "lp_states": args.low_precision_optimizer_states}
    if args.config:
        layout = _layout_from_config(args.config, world)
    rows = []
    for stage in layout["stages"]:
        for precision in layout["precisions"]:
            for offload in layout["offload_optimizer"]:
                est = estimate_model_states(
                    args.params, world, stage, precision, optimizer=layout["optimizer"], offload_optimizer=offload,
                    offload_param=layout["offload_param"] and stage == 3, grad_accum_dtype=layout["grad_accum_dtype"],
                    hpz_partition_size=layout["hpz"], largest_layer_params=args.largest_layer,
                    **_low_precision(layout, stage, precision))
                rows.append((stage, precision, offload, est))
    if args.json:
        for stage, precision, offload, est in rows:
            print(json.dumps({"stage": stage, "precision": precision, "offload_optimizer": offload, **asdict(est),
                              "device_total": est.device_total}))
        return 0
    print(f"Model states per rank for {args.params:,} parameters on {world} rank(s) "
          f"({args.num_nodes} node(s) x {args.gpus}); GiB; host = offloaded to CPU memory")
    print(f"{'stage':>5} {'dtype':>5} {'offload':>7} | {'params':>8} {'grads':>8} {'master':>8} {'optim':>8} | "
          f"{'device':>8} {'host':>8}")
    for stage, precision, offload, est in rows:
        cells = [est.parameters, est.gradients, est.master_weights, est.optimizer_states]
        print(f"{stage:>5} {precision:>5} {'cpu' if offload else 'none':>7} | "
              + " ".join(f"{c / _GB:8.2f}" for c in cells)
              + f" | {est.device_total / _GB:8.2f} {est.host / _GB:8.2f}")
    if any(r[0] == 3 for r in rows) and args.largest_layer:
        print(f"ZeRO-3 also gathers at least the largest layer: {math.ceil(2 * args.largest_layer / 2**20)} MiB "
              "in 16-bit (more with prefetching)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
