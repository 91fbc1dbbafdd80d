"""``deepspeed.runtime.data_pipeline.data_routing.scheduler``: the random-LTD kept-token schedule."""

from shardwise.data.random_ltd import RandomLTDScheduler

__all__ = ["RandomLTDScheduler"]
