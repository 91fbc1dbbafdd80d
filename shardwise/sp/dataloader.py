"""``UlyssesSPDataLoaderAdapter``: every rank of a sequence-parallel group trains on its shard of the same batch.

DeepSpeed's semantics (0.19): each rank still iterates its own loader. On a refill every rank takes one batch from
it, the group exchanges them, and each rank queues *its sequence shard of every rank's batch*, in rank order. So
``next()`` on all P ranks yields shard r of batch 0 (from rank 0), then shard r of batch 1 (from rank 1), ...; P
iterations of the adapter process the P batches one normal data-parallel iteration would have, with all ranks
sharing each sample. ``len(adapter) == len(loader) * P``; use gradient accumulation for more tokens per step.

Per batch (a dict with ``input_ids`` ``[batch, seq]`` and ``labels``, other keys optional):

1. ``position_ids`` are added (``arange(seq)``) when missing, so every shard knows its global positions;
2. sequences are padded to a multiple of P (``pad_to_sp_multiple``): ``input_ids`` with ``pad_token_id``, labels
   with -100, positions continuing, ``attention_mask`` and anything else with 0;
3. labels are shifted *before* sharding: ``shift_labels[:, i] = labels[:, i + 1]`` (-100 after the end), and
   ``labels`` is removed. Shard r's last token predicts the first token of shard r+1, so no target is lost at a
   shard border (shifting inside each shard would drop P-1 targets per row);
4. every tensor whose first two dimensions are ``[batch, seq]`` is cut into P equal sequence chunks and this rank
   keeps chunk r; other tensors and non-tensor values are passed whole.

The model's own loss then needs ``shift_labels`` (transformers' causal-LM loss takes it as a keyword; HF Trainer
does that), or use ``shardwise.sp.tiled_loss``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from shardwise import comm
from shardwise.comm.group import Group
from shardwise.comm.topology import Topology
from shardwise.tp.mappings import all_gather_dim, resolve_group

IGNORE_INDEX = -100


class UlyssesSPDataLoaderAdapter:
    """Wrap a data loader so each sequence-parallel rank gets its shard of the same batches (DeepSpeed's class).

    ``sp_rank``/``sp_world_size`` must describe ``sp_group`` (a ``Group``, torch ProcessGroup or ``Topology``'s
    sp group); ``device``: where the shards are put.
    """

    def __init__(self, dl: Iterable, sp_rank: int, sp_group: Any, sp_world_size: int, device: Any,
                 pad_to_sp_multiple: bool = True, pad_token_id: int = 0) -> None:
        self.group = sp_group.sp_group if isinstance(sp_group, Topology) else resolve_group(sp_group)
        if self.group.size != sp_world_size or self.group.rank != sp_rank:
            raise ValueError(f"UlyssesSPDataLoaderAdapter: sp_rank={sp_rank}, sp_world_size={sp_world_size} but the "
                             f"sp_group {self.group} has this rank at {self.group.rank} of {self.group.size}")
        self.dl = dl
        self.sp_rank, self.sp_group, self.sp_world_size = sp_rank, sp_group, sp_world_size
        self.device = torch.device(device) if device is not None else None
        self.pad_to_sp_multiple = pad_to_sp_multiple
        self.pad_token_id = pad_token_id
        self.iter: Iterator = iter(dl)
        self.micro_batches: deque[dict[str, Any]] = deque()

    def __len__(self) -> int:
        return len(self.dl) * self.sp_world_size  # type: ignore[arg-type]

    def __iter__(self) -> UlyssesSPDataLoaderAdapter:
        return self

    def __next__(self) -> dict[str, Any]:
        if not self.micro_batches:
            self.refill()
        return self.micro_batches.popleft()

    def refill(self) -> None:
        """Take one batch from the wrapped loader, exchange it with the group, queue this rank's shards."""
        try:
            batch = next(self.iter)
        except StopIteration:
            self.iter = iter(self.dl)  # the next epoch starts on the next call, as DeepSpeed's adapter does
            raise
        batch = self._validated(batch)
        everyone = self._gather(batch)
        for rank_batch in everyone:
            self.micro_batches.append(self._shard(rank_batch))

    # -- steps --------------------------------------------------------------------------------------------------------
    def _validated(self, batch: Any) -> dict[str, Any]:
        if not isinstance(batch, dict) or not torch.is_tensor(batch.get("input_ids")):
            raise ValueError("UlyssesSPDataLoaderAdapter: batches must be dicts with an input_ids tensor, got "
                             f"{type(batch).__name__}")
        ids = batch["input_ids"]
        if ids.dim() != 2:
            raise ValueError(f"UlyssesSPDataLoaderAdapter: input_ids must be [batch, seq], got {tuple(ids.shape)}")
        labels = batch.get("labels")
        if not torch.is_tensor(labels) or labels.shape[:2] != ids.shape:
            raise ValueError("UlyssesSPDataLoaderAdapter: batches need a labels tensor shaped like input_ids "
                             f"{tuple(ids.shape)} (got {None if labels is None else tuple(labels.shape)})")
        batch = dict(batch)
        if batch.get("position_ids") is None:
            batch["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1).clone()
        elif batch["position_ids"].shape != ids.shape:
            raise ValueError(f"UlyssesSPDataLoaderAdapter: position_ids {tuple(batch['position_ids'].shape)} must be "
                             f"shaped like input_ids {tuple(ids.shape)}")
        return batch

    def _gather(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's batch, in rank order (tensors by tensor collectives, other values by object gather)."""
        keys = sorted(batch)
        key_lists = comm.all_gather_object(keys, group=self.group)
        if any(k != keys for k in key_lists):
            raise ValueError(f"UlyssesSPDataLoaderAdapter: the ranks' batches have different keys: {key_lists}")
        out: list[dict[str, Any]] = [{} for _ in range(self.group.size)]
        for key in keys:
            value = batch[key]
            pieces = (_gather_tensor(value.to(self.device) if self.device else value, self.group)
                      if torch.is_tensor(value) else comm.all_gather_object(value, group=self.group))
            for rank, piece in enumerate(pieces):
                out[rank][key] = piece
        return out

    def _shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        shape = tuple(batch["input_ids"].shape)
        sequence_keys = [k for k, v in batch.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == shape]
        length, n = shape[1], self.sp_world_size
        if length % n:
            if not self.pad_to_sp_multiple:
                raise ValueError(f"UlyssesSPDataLoaderAdapter: sequence length {length} is not divisible by the "
                                 f"sequence-parallel size {n}; pass pad_to_sp_multiple=True or pad the data")
            target = math.ceil(length / n) * n
            for key in sequence_keys:
                batch[key] = self._pad(key, batch[key], target)
            length = target
        labels = batch.pop("labels")
        batch["shift_labels"] = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].contiguous()
        sequence_keys = [k for k in sequence_keys if k != "labels"] + ["shift_labels"]
        chunk = length // n
        for key in sequence_keys:
            batch[key] = batch[key][:, chunk * self.sp_rank: chunk * (self.sp_rank + 1)].contiguous()
        return batch

    def _pad(self, key: str, tensor: torch.Tensor, target: int) -> torch.Tensor:
        extra = target - tensor.shape[1]
        if key == "position_ids":
            steps = torch.arange(1, extra + 1, device=tensor.device, dtype=tensor.dtype)
            return torch.cat([tensor, tensor[:, -1:] + steps], dim=1)
        fill = IGNORE_INDEX if key in ("labels", "shift_labels") else self.pad_token_id if key == "input_ids" else 0
        pad = tensor.new_full((tensor.shape[0], extra, *tensor.shape[2:]), fill)
        return torch.cat([tensor, pad], dim=1)


def _gather_tensor(tensor: torch.Tensor, group: Group) -> list[torch.Tensor]:
    """Every rank's tensor (shapes may differ: sent padded to the largest, with the shapes alongside)."""
    if group.size == 1:
        return [tensor]
    ndim = torch.tensor([[tensor.dim()]])
    ndims = all_gather_dim(ndim, group, dim=0).flatten().tolist()
    if len(set(ndims)) != 1:
        raise ValueError(f"UlyssesSPDataLoaderAdapter: a batch entry has {ndims} dimensions on the ranks")
    shapes = all_gather_dim(torch.tensor([list(tensor.shape)]), group, dim=0).tolist()
    width = max(math.prod(s) for s in shapes)
    flat = tensor.reshape(-1)
    dtype = flat.dtype
    if dtype == torch.bool:
        flat = flat.to(torch.uint8)  # gloo does not reduce or gather bool
    flat = torch.cat([flat, flat.new_zeros(width - flat.numel())])
    every = all_gather_dim(flat[None], group, dim=0)
    return [row[: math.prod(s)].view(s).to(dtype) for row, s in zip(every, shapes)]
