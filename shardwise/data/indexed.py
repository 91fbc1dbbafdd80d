"""The curriculum index files: DeepSpeed's (Megatron's) memory-mapped indexed format, read and written with numpy.

DeepSpeed's ``DataAnalyzer`` ranks a dataset by a difficulty metric and writes two files per metric, each a pair
``<prefix>.idx`` / ``<prefix>.bin``: ``index_to_sample`` (row ``i``: the ids of the samples sharing the ``i``-th
metric value, rows in increasing metric order) and ``index_to_metric`` (row ``i``: that value). The curriculum
sampler (``sampler.py``) reads them; ``write_metric_index`` produces them from per-sample metric values, for users
without DeepSpeed's analyzer and for tests.

Layout of ``.idx`` (little-endian): the 9-byte magic ``MMIDIDX\\0\\0``, version (u64, 1), dtype code (u8), row count
(u64), document count (u64), then row sizes (int32 x rows), row byte offsets into ``.bin`` (int64 x rows) and
document boundaries (int64 x documents). ``.bin`` holds the rows back to back. Only numpy reads these files
(memory-mapped, no pickle).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
# DeepSpeed's dtype codes (runtime/data_pipeline/data_sampling/indexed_dataset.py)
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.uint16, 7: np.uint32,
           8: np.uint64}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


class IndexFormatError(ValueError):
    """An index file is missing or not in the expected format; the message names the file."""


class IndexedRows:
    """Rows of integers from a ``<prefix>.idx`` / ``<prefix>.bin`` pair, memory-mapped: ``rows[i]`` is a numpy
    array (a read-only view), ``len(rows)`` the row count."""

    def __init__(self, prefix: str | Path) -> None:
        idx, binf = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for path in (idx, binf):
            if not path.is_file():
                raise IndexFormatError(f"curriculum index file {path} does not exist; give the path prefix of a "
                                       ".idx/.bin pair written by DeepSpeed's DataAnalyzer or "
                                       "shardwise.data.write_metric_index")
        with open(idx, "rb") as f:
            head = f.read(9 + 8 + 1 + 8 + 8)
        if len(head) < 34 or head[:9] != _MAGIC:
            raise IndexFormatError(f"{idx} is not an mmap indexed-dataset index (bad magic bytes)")
        (version,) = struct.unpack("<Q", head[9:17])
        code = head[17]
        rows, docs = struct.unpack("<QQ", head[18:34])
        if version != 1 or code not in _DTYPES:
            raise IndexFormatError(f"{idx}: unsupported version {version} or dtype code {code}")
        self.dtype = np.dtype(_DTYPES[code])
        index = np.memmap(idx, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(index, dtype=np.int32, count=rows, offset=34)
        self.pointers = np.frombuffer(index, dtype=np.int64, count=rows, offset=34 + 4 * rows)
        self.doc_idx = np.frombuffer(index, dtype=np.int64, count=docs, offset=34 + 12 * rows)
        self._data = np.memmap(binf, mode="r", dtype=np.uint8) if binf.stat().st_size else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, row: int) -> np.ndarray:
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        return np.frombuffer(self._data, dtype=self.dtype, count=int(self.sizes[row]),
                             offset=int(self.pointers[row]))


def write_rows(prefix: str | Path, rows: Sequence[Sequence[int] | np.ndarray], dtype: type = np.int64) -> None:
    """Write ``rows`` (one document) as ``<prefix>.bin`` / ``<prefix>.idx``."""
    dt = np.dtype(dtype)
    if dt not in _CODES:
        raise ValueError(f"dtype {dt} cannot be stored; use one of {sorted(str(d) for d in _CODES)}")
    arrays = [np.asarray(r, dtype=dt).reshape(-1) for r in rows]
    sizes = np.array([len(a) for a in arrays], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes.astype(np.int64) * dt.itemsize)[:-1]]).astype(np.int64) \
        if len(arrays) else np.zeros(0, np.int64)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.bin", "wb") as f:
        for a in arrays:
            f.write(a.tobytes(order="C"))
    doc_idx = np.array([0, len(arrays)], dtype=np.int64)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", _CODES[dt]))
        f.write(struct.pack("<QQ", len(arrays), len(doc_idx)))
        f.write(sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())


def write_metric_index(prefix: str | Path, metric_values: Sequence[int] | np.ndarray) -> tuple[str, str]:
    """Rank samples by an integer metric (``metric_values[i]`` is sample ``i``'s value) and write the two index
    files the curriculum sampler reads. Returns ``(index_to_sample_path, index_to_metric_path)``: put them in the
    metric's config. Samples with equal values share a row; rows are in increasing metric order."""
    values = np.asarray(metric_values)
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError("metric_values must be a 1-D sequence of integers (one value per sample)")
    order = np.argsort(values, kind="stable")
    uniques, starts = np.unique(values[order], return_index=True)
    bounds = list(starts) + [len(order)]
    sample_rows = [order[bounds[i]:bounds[i + 1]] for i in range(len(uniques))]
    to_sample, to_metric = f"{prefix}_index_to_sample", f"{prefix}_index_to_metric"
    write_rows(to_sample, sample_rows, np.int64)
    write_rows(to_metric, [[int(u)] for u in uniques], np.int64)
    return to_sample, to_metric


__all__ = ["IndexFormatError", "IndexedRows", "write_metric_index", "write_rows"]
