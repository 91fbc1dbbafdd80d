"""``deepspeed.runtime.zero.muon.muon_optimizer``: ``MuonWithAuxAdam`` (``shardwise.ops.muon``)."""

from shardwise.ops.muon import MuonWithAuxAdam

__all__ = ["MuonWithAuxAdam"]
