"""``PipelineModule``: a model written as a list of layers, of which each pipeline stage builds and runs its own.

The layer list (``LayerSpec``s, ``TiedLayerSpec``s, ``nn.Module``s, plain callables) is partitioned into
``num_stages * virtual_stages`` contiguous parts (``partition.py``); stage ``s`` owns parts ``s, s + p, s + 2p, ...``
(one per model chunk; one part without virtual stages). Only owned layers are built, so a stage holds only its own
weights. Layers are registered under their *global* index (``"3.weight"``) and tied modules under
``"tied_modules.<key>"``, as DeepSpeed names them: parameter names do not depend on the number of stages, which is
what lets a checkpoint saved with 2 stages load with 1 or 4, and an ``nn.Sequential`` of the same layers load it.

Tied weights (``TiedLayerSpec`` with the same key on several stages): each holding stage builds the module; at
construction the weights are broadcast from the first holding stage, and the engine sums their gradients over the
holding stages before every optimizer step, so the copies stay identical. Groups come from the ``Topology``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from shardwise import comm
from shardwise.comm import grid
from shardwise.comm.topology import Topology
from shardwise.pipe.partition import partition_layers
from shardwise.pipe.spec import LayerSpec, TiedLayerSpec
from shardwise.pipe.topology import PipeModelDataParallelTopology, to_degrees

__all__ = ["PipelineModule", "PipelineError"]


class PipelineError(Exception):
    """Misuse of a pipeline module or engine (``deepspeed.runtime.pipe.module.PipelineError``)."""


def _set_seed(seed: int, seed_fn: Callable | None) -> None:
    if seed_fn is not None:
        seed_fn(seed)
        return
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for seeding
        pass


def _default_checkpoint_func() -> Callable:
    """shardwise's activation checkpointing when available, else torch's (non-reentrant)."""
    for name in ("shardwise.checkpointing", "shardwise.activation_checkpointing"):
        try:
            module = __import__(name, fromlist=["checkpoint"])
            return module.checkpoint
        except (ImportError, AttributeError):
            continue
    from torch.utils.checkpoint import checkpoint

    return partial(checkpoint, use_reentrant=False)


def _layer_name(layer: Any) -> str:
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", type(layer).__name__)


def _count_params(layer: Any) -> int:
    """Trainable parameters of one layer spec (built on the meta device: no memory, no RNG use)."""
    if isinstance(layer, nn.Module):
        return sum(p.numel() for p in layer.parameters() if p.requires_grad)
    if not isinstance(layer, LayerSpec):
        return 0
    try:
        with torch.device("meta"):
            built = layer.build()
    except Exception:  # layers that cannot be built on meta (collectives, .item() in __init__): build for real
        built = layer.build()
    return sum(p.numel() for p in built.parameters() if p.requires_grad)


def _resolve_topology(num_stages: int | None, topology: Any) -> Topology:
    if topology is None:
        if num_stages is None:
            raise PipelineError("PipelineModule needs num_stages or topology")
        comm.init_distributed()
        return Topology(pp=num_stages)
    if isinstance(topology, Topology):
        topo = topology
    else:
        comm.init_distributed()
        topo = Topology(**to_degrees(topology))
    if num_stages is not None and num_stages != topo.size("pp"):
        raise PipelineError(f"num_stages={num_stages} disagrees with the topology's {topo.size('pp')} pipeline "
                            "stages; pass one of them")
    return topo


class PipelineModule(nn.Module):
    """A sequence of layers split into pipeline stages (``deepspeed.pipe.PipelineModule``).

    ``forward`` runs this stage's layers (``chunk`` selects the model chunk with ``virtual_stages > 1``): the
    output of each layer is the input of the next, tensors or tuples of tensors. ``loss_fn(outputs, labels)`` runs
    on the last stage. ``topology`` may be a ``shardwise.comm.topology.Topology`` (share it with tensor-parallel
    layers) or DeepSpeed's ``PipeModelDataParallelTopology`` / ``PipeDataParallelTopology``. ``virtual_stages``
    (shardwise's extension) gives each rank that many model chunks and selects the interleaved 1F1B schedule.
    """

    def __init__(self, layers: Iterable[Any], num_stages: int | None = None, topology: Any = None,
                 loss_fn: Callable | None = None, seed_layers: bool = False, seed_fn: Callable | None = None,
                 base_seed: int = 1234, partition_method: str = "parameters", activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Callable | None = None, checkpointable_layers: list[str] | None = None,
                 dynamic_shape: bool = False, virtual_stages: int = 1) -> None:
        super().__init__()
        if checkpointable_layers is not None and not isinstance(checkpointable_layers, list):
            raise TypeError("checkpointable_layers must be a list of layer class names")
        if virtual_stages < 1:
            raise PipelineError(f"virtual_stages must be >= 1, got {virtual_stages}")
        self._topology = _resolve_topology(num_stages, topology)
        self.loss_fn = loss_fn
        self.seed_layers = seed_layers
        self.seed_fn = seed_fn
        self.base_seed = base_seed
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func or _default_checkpoint_func()
        self.checkpointable_layers = checkpointable_layers
        self.dynamic_shape = dynamic_shape
        self.virtual_stages = virtual_stages
        self.micro_offset = 0
        self.num_stages = self._topology.size("pp")
        self.stage_id = self._topology.coord("pp")
        self.global_rank = self._topology.rank
        self.world_size = self._topology.world_size
        self._layer_specs = list(layers)
        self._num_layers = len(self._layer_specs)
        self.partition_method = partition_method
        self.parts = self._partition(partition_method)
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: dict[str, list[str]] = {}
        self.forward_funcs: list[list[tuple[int, Callable]]] = [self._build_chunk(c) for c in range(virtual_stages)]
        self._local_start, self._local_stop = self.chunk_bounds(0)
        from shardwise.accelerator import get_accelerator

        self.to(get_accelerator().device())
        self.tied_comms = self._index_tied_modules()
        self._synchronize_tied_weights()

    # -- construction -------------------------------------------------------------------------------------------------
    def _partition(self, method: str) -> list[int]:
        parts = self.num_stages * self.virtual_stages
        names = [_layer_name(layer) for layer in self._layer_specs]
        counts = [_count_params(layer) for layer in self._layer_specs] if method.lower() == "parameters" else []
        try:
            return partition_layers(method, parts, names, counts)
        except ValueError as exc:
            raise PipelineError(str(exc)) from exc

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """Global layer range ``[start, stop)`` of this rank's ``chunk``."""
        part = chunk * self.num_stages + self.stage_id
        return self.parts[part], self.parts[part + 1]

    def _build_chunk(self, chunk: int) -> list[tuple[int, Callable]]:
        start, stop = self.chunk_bounds(chunk)
        funcs: list[tuple[int, Callable]] = []
        for idx in range(start, stop):
            layer = self._layer_specs[idx]
            if self.seed_layers:
                _set_seed(self.base_seed + idx, self.seed_fn)
            if isinstance(layer, PipelineModule):
                raise PipelineError("nested PipelineModules are not supported; flatten the layer list")
            if isinstance(layer, TiedLayerSpec):
                if layer.key not in self.tied_modules:
                    self.tied_modules[layer.key] = layer.build()
                    self.tied_weight_attrs[layer.key] = layer.tied_weight_attr
                module = self.tied_modules[layer.key]
                funcs.append((idx, partial(layer.forward_fn, module) if layer.forward_fn else module))
            elif isinstance(layer, (LayerSpec, nn.Module)):
                module = layer.build() if isinstance(layer, LayerSpec) else layer
                self.add_module(str(idx), module)
                funcs.append((idx, module))
            elif callable(layer):
                funcs.append((idx, layer))
            else:
                raise PipelineError(f"layer {idx} ({layer!r}) is not an nn.Module, LayerSpec or callable")
        return funcs

    def stage_owner(self, layer_idx: int) -> int:
        """The pipeline stage that owns global layer ``layer_idx``."""
        if not 0 <= layer_idx < self._num_layers:
            raise IndexError(f"layer {layer_idx} is not in 0..{self._num_layers - 1}")
        for part in range(len(self.parts) - 1):
            if self.parts[part] <= layer_idx < self.parts[part + 1]:
                return part % self.num_stages
        raise AssertionError("unreachable: partitions cover every layer")

    def _index_tied_modules(self) -> dict[str, dict[str, Any]]:
        """For each tied key held by more than one stage: the group of holding ranks (same dp/sp/tp coordinates)."""
        comms: dict[str, dict[str, Any]] = {}
        keys = sorted({s.key for s in self._layer_specs if isinstance(s, TiedLayerSpec)})
        for key in keys:
            positions = [i for i, s in enumerate(self._layer_specs) if isinstance(s, TiedLayerSpec) and s.key == key]
            stages = sorted({self.stage_owner(i) for i in positions})
            if len(stages) < 2:
                continue
            group = _tie_group(self._topology, key, stages)
            # the first use of the key defines the weights (and counts them in norms): with chunks that need not be
            # the lowest stage
            source = self._topology.rank_at(pp=self.stage_owner(positions[0]))
            if key in self.tied_modules:
                comms[key] = {"ranks": list(group.ranks), "group": group, "weight_attr": self.tied_weight_attrs[key],
                              "module": self.tied_modules[key], "source": source,
                              "owner": source == self.global_rank}
        return comms

    @torch.no_grad()
    def _synchronize_tied_weights(self) -> None:
        """Make every copy of a tied weight equal to the first holding stage's."""
        if not comm.is_initialized():
            return
        for key, info in self.tied_comms.items():
            for attr in info["weight_attr"]:
                weight = _getattr_path(self.tied_modules[key], attr)
                comm.broadcast(weight.data, src=info["source"], group=info["group"])

    # -- DeepSpeed's module API ----------------------------------------------------------------------------------------
    def get_tied_weights_and_groups(self) -> list[tuple[nn.Parameter, Any]]:
        """``(weight, group)`` for every tied weight this rank holds and shares with another stage."""
        out = []
        for key, info in self.tied_comms.items():
            for attr in info["weight_attr"]:
                out.append((_getattr_path(self.tied_modules[key], attr), info["group"]))
        return out

    def allreduce_tied_weight_gradients(self) -> None:
        """Sum ``.grad`` of tied weights over their holding stages (for loops that do not use the engine)."""
        for weight, group in self.get_tied_weights_and_groups():
            if weight.grad is not None:
                comm.all_reduce(weight.grad, group=group)

    def tied_duplicates(self) -> list[nn.Parameter]:
        """Tied weights this rank holds as a copy (not the first holder): counted once in global norms."""
        return [w for key, info in self.tied_comms.items() if not info["owner"]
                for w in (_getattr_path(self.tied_modules[key], a) for a in info["weight_attr"])]

    def topology(self) -> Topology:
        """The process grid (pp = stages, tp from the pipeline topology, dp = the rest)."""
        return self._topology

    @property
    def _topo(self) -> PipeModelDataParallelTopology:
        """DeepSpeed's view of the grid (``ProcessTopology`` queries such as ``get_coord``)."""
        t = self._topology
        return PipeModelDataParallelTopology(num_pp=t.size("pp"), num_mp=t.size("tp"), num_dp=t.size("dp"))

    def mpu(self) -> Any:
        """A Megatron-style model-parallel unit for this grid."""
        from shardwise.pipe.grid import PipelineParallelGrid

        return PipelineParallelGrid(self._topology)

    def num_pipeline_stages(self) -> int:
        """Number of pipeline stages."""
        return self.num_stages

    def partitions(self) -> list[int]:
        """Layer boundaries of every part (``stages * virtual_stages + 1`` entries)."""
        return list(self.parts)

    def set_checkpoint_interval(self, interval: int) -> None:
        """Checkpoint activations every ``interval`` layers (0: off)."""
        if interval < 0:
            raise ValueError("the activation checkpoint interval must be >= 0")
        self.activation_checkpoint_interval = interval

    def get_additional_losses(self) -> dict[str, torch.Tensor] | None:
        """Extra losses to report besides the main one (override in subclasses)."""
        return None

    def is_first_stage(self) -> bool:
        """This rank runs the first layers."""
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        """This rank runs the last layers and the loss."""
        return self.stage_id == self.num_stages - 1

    # -- forward ------------------------------------------------------------------------------------------------------
    def forward(self, forward_input: Any, chunk: int = 0) -> Any:
        """Run this rank's layers of ``chunk`` (with activation checkpointing every ``interval`` layers)."""
        self.micro_offset += 1
        funcs = self.forward_funcs[chunk]
        interval = self.activation_checkpoint_interval
        if interval <= 0 or not torch.is_grad_enabled():
            return self._run_range(funcs, self.micro_offset)(forward_input)
        x = forward_input
        for start in range(0, len(funcs), interval):
            group = funcs[start : start + interval]
            run = self._run_range(group, self.micro_offset)
            args = x if isinstance(x, tuple) else (x,)
            x = self.activation_checkpoint_func(run, *args) if self._is_checkpointable(group) else run(*args)
        return x

    def _run_range(self, funcs: list[tuple[int, Callable]], offset: int) -> Callable:
        def run(*inputs: Any) -> Any:
            x = inputs[0] if len(inputs) == 1 else inputs
            for idx, layer in funcs:
                if self.seed_layers:
                    _set_seed(self.base_seed * offset + idx, self.seed_fn)
                x = layer(x)
            return x

        return run

    def _is_checkpointable(self, funcs: list[tuple[int, Callable]]) -> bool:
        if self.checkpointable_layers is not None:
            return all(type(f).__name__ in self.checkpointable_layers for _, f in funcs)
        return any(isinstance(f, nn.Module) and any(True for _ in f.parameters()) for _, f in funcs)

    def extra_repr(self) -> str:
        return (f"stage {self.stage_id}/{self.num_stages}, chunks {self.virtual_stages}, "
                f"layers {[self.chunk_bounds(c) for c in range(self.virtual_stages)]}")


def _getattr_path(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _tie_group(topology: Topology, key: str, stages: list[int]) -> Any:
    """The group of ranks at ``stages`` sharing this rank's data/sequence/tensor coordinates (created collectively
    for every such coordinate on every rank, in the same order)."""
    sizes = topology.sizes
    families = []
    for fixed in grid.axis_groups(("pp",), sizes):  # one pipeline per (dp, sp, tp) coordinate
        coords = grid.coords_of(fixed[0], sizes)
        families.append(tuple(grid.rank_of({**coords, "pp": s}, sizes) for s in stages))
    return topology.custom_group(f"tied:{key}", families)
