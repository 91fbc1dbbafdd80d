"""DeepSpeed's ``deepspeed.sequence`` package path (``deepspeed.sequence.layer.DistributedAttention``)."""
