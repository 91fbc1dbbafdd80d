"""Transient device buffers of a training step that are neither model states nor saved activations.

Sized from what the probe read off the real strategy (its largest ZeRO-3 unit, its bucket size, how many
reductions it lets run at once) and the strategies' code:

* ZeRO-3 (``zero/stage3/``): the unit being computed and the one prefetched are gathered in the model dtype
  (2 units); backward keeps the unit's flat gradient plus up to ``max_inflight`` more whose reduce-scatters are in
  flight (``max_inflight + 1`` units in the gradient dtype);
* ZeRO-2 (``zero/reducer.py``): gradients of a bucket gather in a staging buffer until it is reduced; up to
  ``max_inflight`` reduced while the next fills (``max_inflight + 1`` buckets in the gradient dtype);
* stages 0/1 reduce the full gradient buffer in place: one bucket's partition at most (a temporary);
* the LM head's logits in the model dtype (the loss keeps their fp32 softmax, counted with the activations).
"""

from __future__ import annotations

from typing import Any


def transient_buffers(probe: Any, source: Any, setup: Any) -> dict[str, int]:
    """Device bytes by kind (see the module docstring)."""
    out: dict[str, int] = {}
    if probe.stage == 3:
        out["zero3_gathered"] = 2 * probe.largest_unit * probe.param_bytes
        out["zero3_grad_buffers"] = (probe.max_inflight + 1) * probe.largest_unit * probe.grad_bytes
        if probe.hpz_secondary:
            out["hpz_secondary"] = probe.hpz_secondary
    elif probe.stage == 2:
        out["reduce_buckets"] = (probe.max_inflight + 1) * probe.bucket_numel * probe.grad_bytes
    else:
        out["reduce_buckets"] = probe.bucket_numel * probe.grad_bytes
    if probe.has_head and source.llama is not None:
        tokens = probe.micro_batch * setup.seq_len // setup.sp
        out["logits"] = tokens * source.llama.vocab_size // setup.tp * probe.param_bytes
    return out
