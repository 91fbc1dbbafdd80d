"""``ZeroParamStatus``: where a ZeRO-3 parameter's full values are (DeepSpeed's enum, same member names).

Members are also strings (``ZeroParamStatus.AVAILABLE == "AVAILABLE"``), so code comparing ``ds_status`` with
either the enum or its name works."""

from __future__ import annotations

import enum


class ZeroParamStatus(str, enum.Enum):
    """``AVAILABLE``: gathered (full values in ``.data``); ``NOT_AVAILABLE``: only this rank's shard is held;
    ``INFLIGHT``: being gathered."""

    AVAILABLE = "AVAILABLE"
    NOT_AVAILABLE = "NOT_AVAILABLE"
    INFLIGHT = "INFLIGHT"

    def __str__(self) -> str:
        return self.value


__all__ = ["ZeroParamStatus"]
