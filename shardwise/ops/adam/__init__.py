"""Adam optimizers under DeepSpeed's names (``deepspeed.ops.adam``).

``CPUAdam`` (alias ``DeepSpeedCPUAdam``) steps fp32 parameters in CPU memory with a C kernel;
``FusedAdam`` is the same update on any device (C kernel on CPU, torch's fused kernels elsewhere);
``adam_step_flat`` is the functional step the ZeRO-Offload engine calls on flat partitions.
"""

from shardwise.ops.adam.cpu_adam import CPUAdam, DeepSpeedCPUAdam, adam_step_flat, adam_step_multi, backend_name
from shardwise.ops.adam.fused_adam import FusedAdam

__all__ = ["CPUAdam", "DeepSpeedCPUAdam", "FusedAdam", "adam_step_flat", "adam_step_multi", "backend_name"]
