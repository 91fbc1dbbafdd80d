"""``deepspeed.runtime.sequence_parallel.ulysses_sp``: what accelerate and Trainer import, from ``shardwise.sp``."""

from shardwise.sp.dataloader import UlyssesSPDataLoaderAdapter
from shardwise.sp.hf_ulysses import UlyssesSPAttentionHF
from shardwise.sp.tiled_loss import TiledFusedLogitsLoss

__all__ = ["TiledFusedLogitsLoss", "UlyssesSPAttentionHF", "UlyssesSPDataLoaderAdapter"]
