"""``deepspeed.runtime.data_pipeline.data_routing.basic_layer``: the random-LTD layer wrapper."""

from shardwise.data.random_ltd import RandomLayerTokenDrop

__all__ = ["RandomLayerTokenDrop"]
