"""How long a collective may wait before it fails: the setting, where it comes from, and its validation.

One value bounds every collective of the job: it becomes the process groups' timeout at ``init_distributed``,
so a rank that waits longer than this for a peer (gloo: every collective and point-to-point message) raises a
``CollectiveError`` naming the operation, its group and the ranks that did not arrive (``arrivals.py``).

Where it comes from, first match wins:

1. ``init_distributed(timeout=...)`` (seconds or a ``timedelta``); ``initialize()`` passes the config's
   ``comms_config.timeout`` (seconds) here, as DeepSpeed has no config key for it;
2. the ``SHARDWISE_COMM_TIMEOUT`` environment variable, in seconds (decimals allowed);
3. DeepSpeed's ``DEEPSPEED_TIMEOUT`` environment variable, in whole minutes, so DeepSpeed job scripts keep working;
4. 30 minutes, DeepSpeed's ``default_pg_timeout``.

A value that is not a number, not finite, zero, negative or absurdly large is refused with an error naming where
it came from and what to write instead: a zero or negative timeout used to break the store connection instead.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping

__all__ = [
    "DEFAULT_TIMEOUT",
    "DS_TIMEOUT_ENV",
    "MAX_TIMEOUT_SECONDS",
    "TIMEOUT_ENV",
    "TimeoutSettingError",
    "check_timeout",
    "group_timeout_seconds",
    "resolve_timeout",
]

#: DeepSpeed's default process-group timeout.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
#: Ours, in seconds.
TIMEOUT_ENV = "SHARDWISE_COMM_TIMEOUT"
#: DeepSpeed's, in minutes.
DS_TIMEOUT_ENV = "DEEPSPEED_TIMEOUT"
#: 30 days: any longer is a hang, not a wait (and far beyond it the value overflows a timedelta).
MAX_TIMEOUT_SECONDS = 30 * 24 * 3600


class TimeoutSettingError(ValueError):
    """A collective timeout that is not a positive, finite number of seconds."""


def check_timeout(value: object, source: str, unit: str = "seconds") -> datetime.timedelta:
    """``value`` (a number, a numeric string, or a timedelta; in ``unit``: seconds or minutes) as a timedelta.

    ``source`` names where the value came from in the error (e.g. ``"SHARDWISE_COMM_TIMEOUT"``,
    ``"comms_config.timeout"``)."""
    scale = 60.0 if unit == "minutes" else 1.0
    example = "30 (half an hour)" if unit == "minutes" else "600 (10 minutes)"
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        seconds = float("nan")
    else:
        try:
            seconds = float(str(value).strip() if isinstance(value, str) else value) * scale  # type: ignore[arg-type]
        except (TypeError, ValueError):
            seconds = float("nan")
    if math.isnan(seconds):
        raise TimeoutSettingError(
            f"{source}={value!r} is not a number of {unit}; set e.g. {source}={example}, or leave it unset for the "
            f"default of {DEFAULT_TIMEOUT.total_seconds() / 60:.0f} minutes"
        )
    if seconds <= 0:
        raise TimeoutSettingError(
            f"{source}={value!r}: a collective timeout must be greater than 0 {unit} (a zero or negative one "
            f"fails every wait at once); set e.g. {source}={example}"
        )
    if seconds > MAX_TIMEOUT_SECONDS:
        raise TimeoutSettingError(
            f"{source}={value!r} is more than 30 days; a collective waiting that long is hung. Use a value up to "
            f"{MAX_TIMEOUT_SECONDS / scale:.0f} {unit}"
        )
    return datetime.timedelta(seconds=seconds)


def resolve_timeout(
    explicit: datetime.timedelta | float | None = None, environ: Mapping[str, str] | None = None
) -> tuple[datetime.timedelta, str]:
    """The collective timeout and where it came from (see the module docstring for the order)."""
    env = os.environ if environ is None else environ
    if explicit is not None:
        return check_timeout(explicit, "init_distributed(timeout)"), "init_distributed(timeout)"
    for name, unit in ((TIMEOUT_ENV, "seconds"), (DS_TIMEOUT_ENV, "minutes")):
        text = env.get(name, "")
        if text.strip():
            return check_timeout(text, name, unit), name
    return DEFAULT_TIMEOUT, "default"


def group_timeout_seconds(torch_group: object = None) -> float:
    """The timeout a process group was created with (``None``: the default group), in seconds; the default
    timeout where the backend does not say (only gloo's options are read)."""
    import torch
    import torch.distributed as dist

    try:
        pg = torch_group or dist.distributed_c10d._get_default_group()
        return pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()  # type: ignore[union-attr]
    except (AttributeError, RuntimeError, ValueError):
        return DEFAULT_TIMEOUT.total_seconds()
