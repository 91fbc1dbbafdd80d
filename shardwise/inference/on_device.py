"""``OnDevice``: build a model directly on a device (usually ``meta``) in a chosen dtype, as DeepSpeed's context does.

    with shardwise.OnDevice(dtype=torch.bfloat16, device="meta"):
        model = AutoModelForCausalLM.from_config(config)
    engine = shardwise.init_inference(model, tensor_parallel={"tp_size": 2}, checkpoint="path/to/model")

On ``meta`` nothing is allocated, so a model of any size is built in milliseconds; ``init_inference`` then gives
each rank only its slices from the checkpoint. Implemented with torch's own device context plus the default
floating dtype: every factory call inside (``torch.empty``, ``nn.Linear(...)``, buffers) lands on ``device``, and
tensors created in the default floating dtype (module parameters) get ``dtype``; a call naming its dtype keeps it
(a rotary table computed in float32 stays float32). Both settings are restored on exit.
"""

from __future__ import annotations

from typing import Any

import torch


class OnDevice:
    """Context manager: tensors created inside go to ``device``; those of the default floating dtype get ``dtype``."""

    def __init__(self, dtype: torch.dtype | None = None, device: str | torch.device = "meta",
                 enabled: bool = True) -> None:
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"OnDevice dtype must be a floating dtype (it sets torch's default dtype), got {dtype}")
        self.dtype, self.device, self.enabled = dtype, torch.device(device), enabled
        self._device_ctx: Any = None
        self._saved_dtype: torch.dtype | None = None

    def __enter__(self) -> OnDevice:
        if not self.enabled:
            return self
        self._saved_dtype = torch.get_default_dtype()
        if self.dtype is not None:
            torch.set_default_dtype(self.dtype)
        self._device_ctx = torch.device(self.device)
        self._device_ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        self._device_ctx.__exit__(*exc)
        torch.set_default_dtype(self._saved_dtype)
