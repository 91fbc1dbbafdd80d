"""``RepeatingLoader``: iterate a data loader forever (``deepspeed.utils.RepeatingLoader``)."""

from __future__ import annotations

from typing import Any


class RepeatingLoader:
    """Wraps an iterable and restarts it when exhausted (``deepspeed.utils.RepeatingLoader``)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._it = iter(loader)

    def __iter__(self) -> RepeatingLoader:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            if hasattr(self.loader, "sampler") and hasattr(self.loader.sampler, "set_epoch"):
                self.loader.sampler.set_epoch(getattr(self.loader.sampler, "epoch", 0) + 1)
            self._it = iter(self.loader)
            return next(self._it)
