"""Is an unknown top-level key a misspelling of a known one? (DeepSpeed silently ignores unknown top-level keys.)

A near miss is refused (the feature the user meant would silently be off); anything else is only a warning, because
real configs carry keys of their own (``cuda_visible_devices``) that DeepSpeed ignores. Four tests, any of which
makes a near miss, each chosen to catch a kind of slip without catching ordinary extra keys:

1. overall similarity (difflib ratio >= 0.8): ``zero_optimisation``, ``fp_16``, ``optimzer``;
2. one edit or one swap of adjacent letters, for keys of 4+ letters: ``fp61``, ``bf61``, ``bf166``;
3. abbreviated words: every word of the key (3+ letters) starts a different word of the known key, and together
   they cover all its words: ``optim``, ``sched``, ``clip_grad``, ``comm_data_type``;
4. names other frameworks use for the same setting (``SYNONYMS``): ``zero``, ``lr_scheduler``, ``max_grad_norm``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import suggest

SIMILARITY = 0.8  # catches zero_optimisation, not cuda_visible_devices
SYNONYMS = {
    "zero": "zero_optimization",
    "zero_stage": "zero_optimization",
    "zero_config": "zero_optimization",
    "lr_scheduler": "scheduler",
    "lr_schedule": "scheduler",
    "max_grad_norm": "gradient_clipping",
    "grad_norm_clip": "gradient_clipping",
    "batch_size": "train_batch_size",
    "global_batch_size": "train_batch_size",
    "micro_batch_size": "train_micro_batch_size_per_gpu",
    "micro_batch_size_per_gpu": "train_micro_batch_size_per_gpu",
    "float16": "fp16",
    "half": "fp16",
}


def _edit_distance_at_most_one(a: str, b: str) -> bool:
    """Damerau distance <= 1: equal, one substitution, one insertion/deletion, or one adjacent swap."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k in range(len(short)) if short[k] != long[k]), len(short))
    return short[i:] == long[i + 1:]


def _abbreviates(key: str, known: str) -> bool:
    """Every word of ``key`` (3+ letters) starts a distinct word of ``known``, and all of ``known``'s are used."""
    words, targets = [w for w in key.split("_") if w], known.split("_")
    if not words or len(words) != len(targets) or any(len(w) < 3 for w in words):
        return False
    free = list(targets)
    for word in sorted(words, key=len, reverse=True):
        match = next((t for t in free if t.startswith(word)), None)
        if match is None:
            return False
        free.remove(match)
    return True


def near_miss(key: str, known: Iterable[str]) -> str | None:
    """The known top-level key that ``key`` most likely misspells, or None when it looks like a key of its own."""
    pool = sorted(known, key=lambda k: (len(k), k))
    lowered = key.strip().lower()
    if lowered in SYNONYMS and SYNONYMS[lowered] in pool:
        return SYNONYMS[lowered]
    close = suggest(key, pool, cutoff=SIMILARITY)
    if close is not None:
        return close
    if len(lowered) >= 4:
        close = next((k for k in pool if _edit_distance_at_most_one(lowered, k.lower())), None)
        if close is not None:
            return close
    return next((k for k in pool if _abbreviates(lowered, k.lower())), None)
