"""The only place ZeRO registers autograd hooks.

Stages 0-2: one post-accumulate-grad hook per trainable parameter hands the finished gradient to the
``GradReducer``. (Stage 3's module hooks live beside its parameter groups, registered from here too.)
"""

from __future__ import annotations

from typing import Any

from shardwise.zero.reducer import GradReducer


def register_grad_hooks(reducer: GradReducer) -> list[Any]:
    """Attach the reducer to every parameter it manages; returns the handles (``remove()`` to detach)."""
    handles = []
    for gi, group in enumerate(reducer.groups):
        for pi, param in enumerate(group.params):
            handles.append(param.register_post_accumulate_grad_hook(_make_hook(reducer, gi, pi)))
    return handles


def _make_hook(reducer: GradReducer, gi: int, pi: int):
    def hook(_param: Any) -> None:
        reducer.on_grad_ready(gi, pi)

    return hook
