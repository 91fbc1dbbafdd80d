"""Sequence parallelism: all-to-all attention (DeepSpeed-Ulysses), for shardwise's own layers (``ulysses``) and for
unmodified Hugging Face models (``hf_ulysses`` + ``hf_registry``: DeepSpeed's ``UlyssesSPAttentionHF``), with the
sequence-sharding data loader adapter (``dataloader``) and the tiled loss and its group reduction (``tiled_loss``).
Megatron-style sequence parallelism (norms and dropout on sequence shards between tensor-parallel layers) lives in
``shardwise.tp`` (``sequence_parallel=True``)."""

from shardwise.sp.dataloader import UlyssesSPDataLoaderAdapter
from shardwise.sp.hf_ulysses import UlyssesSPAttentionHF
from shardwise.sp.tiled_loss import TiledFusedLogitsLoss, sequence_parallel_mean, tiled_cross_entropy_sum
from shardwise.sp.ulysses import DistributedAttention, all_to_all_dims, seq_all_to_all

__all__ = ["DistributedAttention", "TiledFusedLogitsLoss", "UlyssesSPAttentionHF", "UlyssesSPDataLoaderAdapter",
           "all_to_all_dims", "seq_all_to_all", "sequence_parallel_mean", "tiled_cross_entropy_sum"]
