"""Sequence parallelism: all-to-all attention (DeepSpeed-Ulysses). Megatron-style sequence parallelism (norms and
dropout on sequence shards between tensor-parallel layers) lives in ``shardwise.tp`` (``sequence_parallel=True``)."""

from shardwise.sp.ulysses import DistributedAttention, all_to_all_dims, seq_all_to_all

__all__ = ["DistributedAttention", "all_to_all_dims", "seq_all_to_all"]
