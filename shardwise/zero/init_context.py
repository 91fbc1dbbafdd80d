"""``zero.Init``, ``GatheredParameters`` and ``register_external_parameter``: ZeRO-3 outside the training step.

[Note: zero.Init]
Inside ``Init``, every ``nn.Module`` subclass's ``__init__`` is wrapped: when a module finishes constructing, each
parameter it owns directly is broadcast from rank 0 (so every rank agrees whatever its RNG did) and cut down to this
rank's contiguous 1/world of its flattened values (``param._sw_init_shard``); ``.data`` becomes empty. Modules
finish construction children first, so at any time a rank holds the full values of at most one module's own
parameters: building a model much larger than one rank's share never materialises it. The engine later regroups
these per-parameter shards into its units (one parameter at a time).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from shardwise import comm
from shardwise.accelerator import get_accelerator
from shardwise.comm.collectives import all_gather_padded
from shardwise.comm.group import Group, as_group
from shardwise.comm.shards import shard_bounds
from shardwise.zero.param_status import ZeroParamStatus
from shardwise.zero.sharded_param import ZeroParameter, sharded


def full_shape(param: nn.Parameter) -> torch.Size:
    """A parameter's real shape, also while ``zero.Init`` keeps only a shard of it."""
    return param._sw_init_shape if hasattr(param, "_sw_init_shard") else param.shape


def full_param_values(param: nn.Parameter, group: Group) -> tuple[torch.Tensor, bool]:
    """A parameter's full values: its data, or all-gathered from ``zero.Init`` shards (second item True then)."""
    shard = getattr(param, "_sw_init_shard", None)
    if shard is None:
        return param.data, False
    shape = param._sw_init_shape
    return all_gather_padded(shard, shape.numel(), param._sw_init_group).view(shape), True


class InitParameter(ZeroParameter):
    """The class a parameter built under ``zero.Init`` is switched to once partitioned: DeepSpeed's ``ds_*``
    attributes from construction on (Trainer and PEFT count parameters with ``ds_numel``), before any engine
    exists. The engine later switches it to :class:`~shardwise.zero.sharded_param.ZeroParameter`."""

    @property
    def ds_shape(self) -> torch.Size:
        """The full shape (``.shape`` is ``(0,)`` while only the shard is held)."""
        return self._sw_init_shape

    @property
    def ds_numel(self) -> int:
        """Elements of the full parameter."""
        return self._sw_init_shape.numel()

    @property
    def ds_status(self) -> ZeroParamStatus:
        """``AVAILABLE`` inside ``GatheredParameters``, else ``NOT_AVAILABLE``."""
        full = self.data.numel() == self.ds_numel and self.ds_numel > 0
        return ZeroParamStatus.AVAILABLE if full else ZeroParamStatus.NOT_AVAILABLE

    @property
    def ds_id(self) -> int:
        """Construction order of the parameter under ``zero.Init`` (unique in the process)."""
        return self._sw_init_id

    @property
    def ds_tensor(self) -> torch.Tensor:
        """This rank's contiguous piece of the flattened parameter (1-D; may be empty)."""
        return self._sw_init_shard


_next_init_id = 0


def _shard_param(param: nn.Parameter, group: Group, dtype: torch.dtype | None, device: torch.device | None) -> None:
    if hasattr(param, "_sw_init_shard") or sharded(param) is not None:
        return
    data = param.data
    if dtype is not None and data.is_floating_point():
        data = data.to(dtype)
    if device is not None:
        data = data.to(device)
    comm.broadcast(data, src=group.global_rank(0), group=group)
    lo, hi, _ = shard_bounds(data.numel(), group.size, group.rank)
    param._sw_init_shard = data.reshape(-1)[lo:hi].clone()
    param._sw_init_shape = data.shape
    param._sw_init_world = group.size
    param._sw_init_group = group
    global _next_init_id
    param._sw_init_id = _next_init_id
    _next_init_id += 1
    param.data = torch.empty(0, dtype=data.dtype, device=data.device)
    if type(param) is nn.Parameter:
        param.__class__ = InitParameter


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled") is True


def _from_config(config: Any) -> tuple[torch.dtype | None, str | None]:
    """The dtype and remote device a DeepSpeed config (dict, JSON path, or None) asks ``zero.Init`` for."""
    if config is None:
        return None, None
    if not isinstance(config, dict):
        from shardwise.config import read_config_dict

        config = read_config_dict(config)
    dtype = None
    if _enabled(config.get("bf16")) or _enabled(config.get("bfloat16")):
        dtype = torch.bfloat16
    elif _enabled(config.get("fp16")):
        dtype = torch.float16
    zero = config.get("zero_optimization") or {}
    offload = zero.get("offload_param") or {} if isinstance(zero, dict) else {}
    device = offload.get("device") if isinstance(offload, dict) else None
    return dtype, device if device in ("cpu", "nvme") else None


def _all_module_classes() -> list[type]:
    out, todo = [], [nn.Module]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


class Init:
    """Context manager: modules constructed inside are partitioned as they are built (DeepSpeed's ``zero.Init``).

    Arguments follow DeepSpeed's; ``data_parallel_group`` (default: every rank), ``dtype`` (cast before
    partitioning), ``remote_device`` ("cpu"/"nvme": shards are host tensors; NVMe placement happens when the engine
    is built with ``offload_param``), ``enabled``. ``config_dict_or_path`` (or ``config``; a dict or a JSON path)
    supplies what the arguments leave unset, as in DeepSpeed: ``dtype`` from ``bf16``/``fp16`` ``enabled`` (else
    the parameters keep theirs) and ``remote_device`` from ``zero_optimization.offload_param.device``.
    """

    def __init__(self, module: nn.Module | None = None, data_parallel_group: Any = None,
                 mem_efficient_linear: bool = True, remote_device: str | None = None, pin_memory: bool = False,
                 config_dict_or_path: Any = None, config: Any = None, enabled: bool = True,
                 dtype: torch.dtype | None = None, mpu: Any = None,
                 **_ignored: Any) -> None:
        self.enabled = enabled
        cfg_dtype, cfg_device = _from_config(config_dict_or_path if config_dict_or_path is not None else config)
        dtype = dtype if dtype is not None else cfg_dtype
        remote_device = remote_device if remote_device is not None else cfg_device
        self.dtype = dtype
        self.device = torch.device("cpu") if remote_device in ("cpu", "nvme") else None
        self._group_arg = mpu.get_data_parallel_group() if mpu is not None and data_parallel_group is None \
            else data_parallel_group
        self._patched: list[tuple[type, Any]] = []
        self._subclass_hook: Any = None
        if module is not None and enabled:  # DeepSpeed also accepts an already-built module to partition
            self.group = as_group(self._group_arg)
            for m in module.modules():
                for p in m.parameters(recurse=False):
                    _shard_param(p, self.group, self.dtype, self.device)

    def __enter__(self) -> Init:
        if not self.enabled:
            return self
        comm.init_distributed()
        self.group = as_group(self._group_arg)
        for cls in [nn.Module, *_all_module_classes()]:
            self._patch(cls)
        ctx = self
        original_subclass_hook = nn.Module.__dict__.get("__init_subclass__")

        @classmethod  # classes defined inside the context are patched as they are created
        def init_subclass(cls: type, **kwargs: Any) -> None:
            super(nn.Module, cls).__init_subclass__(**kwargs)
            ctx._patch(cls)

        nn.Module.__init_subclass__ = init_subclass
        self._subclass_hook = original_subclass_hook
        return self

    def _patch(self, cls: type) -> None:
        original = cls.__dict__.get("__init__")
        if original is None or getattr(original, "_sw_wrapped", False):
            return
        cls.__init__ = self._wrap(original)
        self._patched.append((cls, original))

    def _wrap(self, original: Any) -> Any:
        ctx = self

        @functools.wraps(original)
        def init(module: nn.Module, *args: Any, **kwargs: Any) -> None:
            # Partition only when the outermost __init__ of this object returns: a subclass may still use the
            # parameters its parent's __init__ created (e.g. to initialise them).
            depth = module.__dict__.get("_sw_init_depth", 0)
            module.__dict__["_sw_init_depth"] = depth + 1
            try:
                original(module, *args, **kwargs)
            finally:
                module.__dict__["_sw_init_depth"] = depth
            if depth == 0:
                del module.__dict__["_sw_init_depth"]
                params = list(module.parameters(recurse=False))
                for p in params:
                    _shard_param(p, ctx.group, ctx.dtype, ctx.device)
                if params:
                    get_accelerator().empty_cache()  # the full values just freed go back to the allocator/OS

        init._sw_wrapped = True
        return init

    def __exit__(self, *exc: Any) -> None:
        for cls, original in reversed(self._patched):
            cls.__init__ = original
        self._patched.clear()
        if self._subclass_hook is not None:
            nn.Module.__init_subclass__ = self._subclass_hook
        elif "__init_subclass__" in nn.Module.__dict__:
            del nn.Module.__init_subclass__


class GatheredParameters:
    """Temporarily gather ZeRO-3 parameters; with ``modifier_rank``, that rank's changes reach every rank.

    Works on parameters of a built engine (their units are gathered and, on exit, shards *and* fp32 masters take the
    modified values) and on parameters still carrying ``zero.Init`` shards. Non-ZeRO-3 parameters: a no-op.
    """

    def __init__(self, params: Any, modifier_rank: int | None = None, fwd_module: Any = None,
                 enabled: bool = True) -> None:
        if isinstance(params, nn.Parameter) or torch.is_tensor(params):
            params = [params]
        self.params = [p for p in (params or []) if sharded(p) is not None or hasattr(p, "_sw_init_shard")]
        self.modifier_rank = modifier_rank
        self.enabled = enabled and bool(self.params)

    def __enter__(self) -> list[nn.Parameter]:
        if not self.enabled:
            return self.params
        for p in self.params:
            state = sharded(p)
            if state is not None:
                state.strategy.fetch([state.unit])
            else:
                values, _ = full_param_values(p, p._sw_init_group)
                p.data = values.clone()
        return self.params

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        # every parameter is broadcast and written back before any unit is released (units hold several params)
        for p in self.params:
            state = sharded(p)
            group = state.unit.comm.group if state is not None else p._sw_init_group
            if self.modifier_rank is not None:
                comm.broadcast(p.data, src=self.modifier_rank, group=group)
                if state is not None:
                    _write_back(p)
                else:
                    lo, hi, _ = shard_bounds(p.data.numel(), group.size, group.rank)
                    p._sw_init_shard.copy_(p.data.reshape(-1)[lo:hi])
        released: list = []
        for p in self.params:
            state = sharded(p)
            if state is not None:
                if state.unit not in released:
                    released.append(state.unit)
                    state.strategy.release([state.unit])
            else:
                p.data = torch.empty(0, dtype=p.data.dtype, device=p.data.device)


@torch.no_grad()
def _write_back(param: nn.Parameter) -> None:
    """Copy a gathered parameter's (modified) values into this rank's shard and fp32 master fragments."""
    flat = param.data.reshape(-1)
    for frag in sharded(param).strategy.fragments(param):
        piece = flat[frag.start : frag.end]
        if frag.model is not None:
            frag.model.copy_(piece)
        if frag.fp32 is not None:
            frag.fp32.copy_(piece)


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """Declare that ``module``'s forward uses ``parameter`` although another module owns it."""
    externals = module.__dict__.setdefault("_sw_external_params", [])
    if all(p is not parameter for p in externals):
        externals.append(parameter)
    state = sharded(parameter)
    if state is not None:
        state.strategy.register_external_units(module, [state.unit])


def unregister_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """Undo ``register_external_parameter``."""
    externals = module.__dict__.get("_sw_external_params", [])
    module.__dict__["_sw_external_params"] = [p for p in externals if p is not parameter]


def is_zero3_param(param: Any) -> bool:
    """Whether ``param`` is partitioned by ZeRO-3 (or by ``zero.Init``)."""
    return sharded(param) is not None or hasattr(param, "_sw_init_shard")


def gathered_param_list(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The ZeRO-3 parameters among ``params``."""
    return [p for p in params if is_zero3_param(p)]
