"""The base class of every config section and the value types their fields use.

Why our own value types rather than pydantic's lax coercion: a ds_config is JSON written by hand, so
``"enabled": "yes"`` or ``"train_batch_size": "eight"`` is almost always a mistake and should be reported with
the key, the value and the fix. The types below accept exactly what JSON users mean (JSON booleans plus the
strings "true"/"false"; integers, and floats such as 5e8 when they are integral; dtype spellings DeepSpeed
accepts) and reject the rest with a message that ``errors.problems_from_validation`` turns into a ConfigError.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from .dtypes import short_name


def _fail(expected: str, fix: str) -> PydanticCustomError:
    return PydanticCustomError("sw_value", "expected {expected}", {"expected": expected, "fix": fix})


def _to_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _fail("true or false", "write a JSON boolean without quotes: true or false")


# Every integer setting is used as a 64-bit count or size; a larger one (e.g. 1e308 written for "infinite") would
# only fail later, deep inside torch or a loop, so it is refused here.
INT_LIMIT = 2**63 - 1


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):
        raise _fail("an integer, not a boolean", "write a whole number, e.g. 8")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail("a finite integer", "write a whole number, e.g. 8")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 5e8 in JSON is a float; DeepSpeed accepts it for integer fields
    if isinstance(value, float):
        raise _fail("an integer (this number has a fractional part)", "write a whole number")
    if not isinstance(value, int):
        raise _fail("an integer", "write a JSON number without quotes, e.g. 8")
    if abs(value) > INT_LIMIT:
        raise _fail(f"an integer of magnitude at most 2**63 - 1 = {INT_LIMIT}",
                    "use a realistic value (no setting counts beyond 64 bits)")
    return value


def _to_float(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail("a number", "write a JSON number without quotes, e.g. 1.0")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range
        raise _fail("a finite number", "write a number below 1.8e308") from None
    if not math.isfinite(value):
        raise _fail("a finite number", "write a finite number")
    return value


def _to_str(value: Any) -> Any:
    if not isinstance(value, str):
        raise _fail("a string", "put the value in double quotes")
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value




def _to_dtype(value: Any) -> Any:
    if isinstance(value, str) and short_name(value) is not None:
        return short_name(value)
    raise _fail('one of "fp32", "fp16", "bf16"', 'write e.g. "bf16" (float32/float16/bfloat16 also accepted)')


def _to_dict(value: Any) -> Any:
    if not isinstance(value, dict):
        raise _fail("a JSON object {...}", "write an object of key/value pairs")
    return value


Bool = Annotated[bool, BeforeValidator(_to_bool)]
Int = Annotated[int, BeforeValidator(_to_int)]
NonNegInt = Annotated[int, BeforeValidator(_to_int), Field(ge=0)]
PosInt = Annotated[int, BeforeValidator(_to_int), Field(ge=1)]
Float = Annotated[float, BeforeValidator(_to_float)]
NonNegFloat = Annotated[float, BeforeValidator(_to_float), Field(ge=0.0)]
PosFloat = Annotated[float, BeforeValidator(_to_float), Field(gt=0.0)]
Fraction = Annotated[float, BeforeValidator(_to_float), Field(ge=0.0, le=1.0)]
Str = Annotated[str, BeforeValidator(_to_str)]
Dtype = Annotated[Literal["fp32", "fp16", "bf16"], BeforeValidator(_to_dtype)]
AnyDict = Annotated[dict[str, Any], BeforeValidator(_to_dict)]
Device = Annotated[Literal["none", "cpu", "nvme"], BeforeValidator(_lower)]


def lowered(kind: Any) -> Any:
    """``kind`` (usually a Literal of lower-case words) accepting any letter case in the JSON."""
    return Annotated[kind, BeforeValidator(_lower)]


def uppered(kind: Any) -> Any:
    """``kind`` (usually a Literal of upper-case words) accepting any letter case in the JSON."""
    return Annotated[kind, BeforeValidator(_upper)]


class Section(BaseModel):
    """Base of every config block: frozen, typed, unknown keys rejected, a docstring on every field.

    Class attributes used by the loader (not fields):
    - ``ds_strict``: whether DeepSpeed itself rejects unknown keys in this block (pydantic-backed there). Used
      only to tell the user, in an unknown-key error, that DeepSpeed would have silently ignored the key.
    - ``aliases``: other key names DeepSpeed accepts silently for a field (``{"prefetch_bucket_size":
      "stage3_prefetch_bucket_size"}``).
    - ``deprecated``: deprecated key names remapped to a field with a warning.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    ds_strict: ClassVar[bool] = True
    aliases: ClassVar[dict[str, str]] = {}
    deprecated: ClassVar[dict[str, str]] = {}
