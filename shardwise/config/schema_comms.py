"""``comms_config``: shardwise's settings of the collectives (DeepSpeed's config has no such block; its timeout
comes only from ``init_distributed(timeout=)`` or the ``DEEPSPEED_TIMEOUT`` environment variable).

``initialize()`` starts torch.distributed before the rest of the config can be resolved (the data-parallel size
comes from the world), so :func:`comms_timeout` validates this one block on its own, straight from the dict.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError

from .errors import KIND_UNKNOWN_KEY, ConfigError, problems_from_validation, suggest
from .schema_base import Section, _to_float

#: 30 days; a collective that waits longer is hung (shardwise.comm.timeouts.MAX_TIMEOUT_SECONDS).
MAX_TIMEOUT_SECONDS = 30 * 24 * 3600

TimeoutSeconds = Annotated[float, BeforeValidator(_to_float), Field(gt=0.0, le=MAX_TIMEOUT_SECONDS)]


class CommsConfig(Section):
    """``comms_config`` (a shardwise key): how the collectives behave."""

    ds_strict = False

    timeout: TimeoutSeconds | None = None
    """Seconds any collective (or pipeline message) may wait for its peers before it fails, naming the ranks that
    did not arrive; null = the SHARDWISE_COMM_TIMEOUT environment variable (seconds), else DEEPSPEED_TIMEOUT
    (minutes), else 30 minutes. Used when ``initialize()`` starts torch.distributed itself."""


def comms_timeout(raw: dict[str, Any]) -> float | None:
    """``comms_config.timeout`` of a raw config dict, validated; None when not set."""
    block = raw.get("comms_config")
    if block is None:
        return None
    if isinstance(block, dict):
        for key in block:
            if key not in CommsConfig.model_fields:
                close = suggest(str(key), CommsConfig.model_fields)
                fix = f"rename it to {close!r}" if close else f"remove it (keys: {', '.join(CommsConfig.model_fields)})"
                raise ConfigError(f"comms_config.{key}: unknown key. Fix: {fix}.", path=f"comms_config.{key}",
                                  kind=KIND_UNKNOWN_KEY)
    try:
        return CommsConfig.model_validate(block).timeout
    except ValidationError as exc:
        raise ConfigError.from_problems(problems_from_validation(exc, "comms_config")) from None
