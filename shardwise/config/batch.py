"""The batch triad: train_batch_size = train_micro_batch_size_per_gpu x gradient_accumulation_steps x dp.

Pure arithmetic, as DeepSpeed's ``_set_batch_related_parameters`` / ``_batch_assertion`` (any two keys
determine the third; TBS alone -> accumulation 1; micro alone -> accumulation 1), except that every failure is
a ConfigError that quotes the numbers, the data-parallel size used, and a concrete fix. DeepSpeed floors the
divisions and then fails with "Gradient accumulation steps: 0"; we say why (usually a config written for
fewer ranks) and which data-parallel sizes would work.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import KIND_BATCH, ConfigError

TBS, MICRO, GAS = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"
MAX_BATCH = 2**31 - 1  # samples per optimizer step: far above any real run, so a larger value is a mistake


def _err(message: str, path: str = TBS) -> ConfigError:
    return ConfigError(message, path=path, kind=KIND_BATCH)


def _fitting_dp_sizes(total: int, per_rank_unit: int, limit: int = 8) -> list[int]:
    """Data-parallel sizes d for which total is a positive multiple of per_rank_unit x d."""
    if per_rank_unit <= 0 or total % per_rank_unit:
        return []
    quotient = total // per_rank_unit
    return [d for d in range(1, quotient + 1) if quotient % d == 0][:limit]


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _fit_note(total: int, unit: int, dp: int) -> str:
    sizes = _fitting_dp_sizes(total, unit)
    if not sizes:
        return ""
    fewer = " It was probably written for fewer ranks." if total < unit * dp else ""
    plural = "sizes" if len(sizes) > 1 else "size"
    return f"{fewer} As written it fits data-parallel {plural} {', '.join(map(str, sizes))}."


def _derive(total: int, known: int, known_key: str, unknown_key: str, dp: int) -> int:
    """total / (known x dp) for the missing key, or a ConfigError explaining why it is not a positive int."""
    unit = known * dp
    if total % unit == 0:
        return total // unit
    floor = total // unit
    zero_note = " (DeepSpeed reports \"Gradient accumulation steps: 0\")" if floor == 0 and unknown_key == GAS else ""
    fixes = [f"set {TBS} to a multiple of {unit} (e.g. {max(floor, 1) * unit})"]
    if total % dp == 0 and _largest_divisor_at_most(total // dp, known) != known:
        fixes.append(f"or set {known_key} to {_largest_divisor_at_most(total // dp, known)}")
    fixes.append(f"or give {unknown_key} explicitly so that the three numbers agree")
    raise _err(
        f"{TBS} {total} is not a multiple of {known_key} {known} x data-parallel size {dp} = {unit}: "
        f"{unknown_key} would be {total} / {unit} = {total / unit:g}{zero_note}.{_fit_note(total, known, dp)} "
        f"Fix: {', '.join(fixes)}.", unknown_key)


def resolve_batch(train_batch_size: int | None, micro: int | None, gas: int | None, dp: int,
                  auto_keys: Sequence[str] = ()) -> tuple[int, int, int]:
    """Return (train_batch_size, micro, gas) for data-parallel size ``dp``, or raise ConfigError."""
    for key, value in ((TBS, train_batch_size), (MICRO, micro), (GAS, gas)):
        if value is not None and value < 1:
            raise _err(f"{key} = {value}: must be a positive integer. Fix: set it to 1 or more (or remove "
                       "it and let the other batch keys determine it).", key)
        if value is not None and value > MAX_BATCH:
            raise _err(f"{key} = {value}: larger than any usable batch (at most {MAX_BATCH} = 2**31 - 1 samples; "
                       "real global batches hold thousands). Fix: set the real batch size.",
                       key)
    tbs, micro, gas = _resolve(train_batch_size, micro, gas, dp, auto_keys)
    if tbs > MAX_BATCH:
        raise _err(f"{TBS} = {MICRO} {micro} x {GAS} {gas} x data-parallel size {dp} = {tbs}: larger than any "
                   f"usable batch (at most {MAX_BATCH} = 2**31 - 1 samples). Fix: lower {MICRO} or {GAS}.")
    return tbs, micro, gas


def _resolve(train_batch_size: int | None, micro: int | None, gas: int | None, dp: int,
             auto_keys: Sequence[str]) -> tuple[int, int, int]:
    tbs = train_batch_size
    if tbs is not None and micro is not None and gas is not None:
        product = micro * gas * dp
        if tbs != product:
            raise _err(f"{TBS} {tbs} != {MICRO} {micro} x {GAS} {gas} x data-parallel size {dp} = {product}; "
                       f"fix one of them ({_suggest_triad(tbs, micro, gas, dp)}).")
        return tbs, micro, gas
    if tbs is not None and micro is not None:
        return tbs, micro, _derive(tbs, micro, MICRO, GAS, dp)
    if tbs is not None and gas is not None:
        return tbs, _derive(tbs, gas, GAS, MICRO, dp), gas
    if micro is not None:
        gas = gas or 1
        return micro * gas * dp, micro, gas
    if tbs is not None:
        return tbs, _derive(tbs, 1, GAS, MICRO, dp), 1  # gradient_accumulation_steps defaults to 1
    autos = [k for k in (TBS, MICRO) if k in auto_keys]
    auto_note = (f" ({' and '.join(autos)} {'is' if len(autos) == 1 else 'are'} \"auto\": \"auto\" batch sizes "
                 "are filled in by the Hugging Face Trainer integration or DeepSpeed's autotuner, neither of "
                 "which ran here)") if autos else ""
    raise _err(f"Either {TBS} or {MICRO} needs to be provided; the config has neither{auto_note}. Fix: add "
               f"e.g. \"{MICRO}\": 4 (with optional \"{GAS}\"); {TBS} is then micro x accumulation x "
               f"data-parallel size ({dp} here).", MICRO)


def _suggest_triad(tbs: int, micro: int, gas: int, dp: int) -> str:
    if tbs % (micro * dp) == 0:
        return f"e.g. {GAS}: {tbs // (micro * dp)}"
    if tbs % (gas * dp) == 0:
        return f"e.g. {MICRO}: {tbs // (gas * dp)}"
    return f"e.g. {TBS}: {micro * gas * dp}"
