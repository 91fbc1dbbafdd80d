"""Optimizer kernels under DeepSpeed's ``deepspeed.ops`` names.

``adam`` (``CPUAdam``/``DeepSpeedCPUAdam``, ``FusedAdam``, ``adam_step_flat``), ``lamb``
(``FusedLamb``), ``lion`` (``FusedLion``, ``DeepSpeedCPULion``) and ``muon`` (``MuonWithAuxAdam``).
The CPU Adam C kernel is built on first use by :mod:`shardwise.ops.build`; importing this package
compiles nothing.
"""

from shardwise.ops import adagrad, adam, lamb, lion, muon

__all__ = ["adagrad", "adam", "lamb", "lion", "muon"]
