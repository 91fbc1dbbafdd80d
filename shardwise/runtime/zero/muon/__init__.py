"""``deepspeed.runtime.zero.muon``: the Muon optimizer (``shardwise.ops.muon``)."""
