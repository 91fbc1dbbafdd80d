"""Alias of DeepSpeed's ``deepspeed.sequence.layer``: the implementation is ``shardwise.sp.ulysses``."""

from shardwise.sp.ulysses import DistributedAttention, _SeqAllToAll, all_to_all_dims, seq_all_to_all

__all__ = ["DistributedAttention", "_SeqAllToAll", "all_to_all_dims", "seq_all_to_all"]
