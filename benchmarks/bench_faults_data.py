"""Fault outcomes of issue 15 (items 3, 4, 5, 7, 9, 11): what each fault does and how long until every rank knows.

Run:  python benchmarks/bench_faults_data.py       (2 gloo ranks on CPU, about a minute; writes results/faults_data.md)

Each row runs one fault on 2 fresh ranks (the tests' forkserver harness, ``tests/dist.py``) and reports the outcome
seen on every rank and the time from the faulty call to the error on the slower rank (inside the ranks, so process
start-up is not counted). "bytes lost" is what a killed save cost the previous checkpoint (nothing: ``latest`` still
loads) and what its temporaries occupied until the next save removed them. The scenarios are the regression tests'
(``tests/distributed/test_checkpoint_faults.py``, ``test_engine_guards.py``, ``tests/unit/test_config_fuzz.py``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

import shardwise
from tests.dist import run_ranks
from tests.distributed import test_checkpoint_faults as ckpt
from tests.distributed import test_engine_guards as guards
from tests.models import mse_loss, rank_batch

RESULTS = Path(__file__).resolve().parent / "results" / "faults_data.md"


def _timed(fn, *args, **kwargs) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        fn(*args, **kwargs)
        outcome = "no error"
    except Exception as exc:  # noqa: BLE001 - the outcome is the point
        outcome = f"{type(exc).__name__}: {exc}"
    return outcome, time.perf_counter() - start


def _load_faults(root: str, cases: list[str]) -> list[tuple[str, str, float]]:
    engine = ckpt._engine()
    return [(case, *_timed(engine.load_checkpoint, os.path.join(root, case))) for case in cases]


def _call_faults(save_dir: str) -> list[tuple[str, str, float]]:
    engine = ckpt._engine()
    x, y = rank_batch(0, engine.global_rank)
    engine.backward(mse_loss(engine, x, y))
    engine.step()
    rows = [("save_checkpoint(save_dir=None)", *_timed(engine.save_checkpoint, None)),
            ("save_checkpoint, bad tag on rank 1 only",
             *_timed(engine.save_checkpoint, save_dir, tag="a/b" if engine.global_rank else "ok"))]
    with engine.no_sync():
        engine.backward(mse_loss(engine, x, y))
        rows.append(("step() inside no_sync()", *_timed(engine.step)))
    return rows


def _unused_fault() -> tuple[str, str, float]:
    config = guards._config(2, zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"},
                                                  "ignore_unused_parameters": False})
    engine, *_ = shardwise.initialize(model=guards._Branchy(), config=config)
    x, y = rank_batch(0, engine.global_rank)
    engine.backward(mse_loss(engine, x, y))
    return ("unused parameters, ZeRO-2 + offload, ignore_unused_parameters false", *_timed(engine.step))


def _prepare_damaged(root: Path) -> list[str]:
    ckpt_run = run_ranks(ckpt._train_and_save, str(root / "good"), ["t"])
    del ckpt_run
    for name, (edit, _) in ckpt.CORRUPTIONS.items():
        (root / name / "t").mkdir(parents=True)
        (root / name / "latest").write_text("t")
        for f in (root / "good" / "t").iterdir():
            (root / name / "t" / f.name).write_bytes(f.read_bytes())
        manifest = json.loads((root / name / "t" / "manifest.json").read_text())
        edit(manifest)
        (root / name / "t" / "manifest.json").write_text(json.dumps(manifest))
    (root / "empty_latest").mkdir()
    (root / "empty_latest" / "latest").write_text("")
    return [*ckpt.CORRUPTIONS, "empty_latest"]


def _killed_save(root: Path, async_save: bool) -> str:
    try:
        run_ranks(ckpt._save_then_die, str(root), async_save, timeout=60)
    except AssertionError:
        pass
    left = list(root.rglob(".tmp-*"))
    size = sum(p.stat().st_size for p in left)
    run_ranks(ckpt._train_and_save, str(root), ["third"], timeout=60)
    after = list(root.rglob(".tmp-*"))
    loads = run_ranks(ckpt._load_each, str(root), ["."])[0][0][1] == "loaded"
    return (f"latest stayed on the previous tag; {len(left)} temporary file(s), {size} bytes, removed by the next "
            f"save ({len(after)} left); latest loads: {loads}")


def _nan_rows() -> list[tuple[str, str]]:
    rows = []
    for label, config in (("fp32, default", guards._config(1)),
                          ("fp32, check_grad_overflow: true", guards._config(1, check_grad_overflow=True)),
                          ("bf16, default (bf16.check_grad_overflow true)", guards._config(1, bf16={"enabled": True}))):
        results = run_ranks(guards._nan_run, config)
        unchanged = all(torch.equal(v, r["after"][k]) for r in results for k, v in r["before"].items())
        finite = all(torch.isfinite(v.float()).all() for r in results for v in r["final"].values())
        warned = sum(1 for r in results for line in r["log"] if "is nan" in line)
        rows.append((f"NaN loss on rank 1 at step 2, {label}",
                     f"skipped steps {results[0]['skipped']}/{results[1]['skipped']} (rank 0/1); step left weights "
                     f"and optimizer state unchanged: {unchanged}; final weights finite: {finite}; warnings: {warned}"))
    return rows


def _config_fuzz_row() -> tuple[str, str, str]:
    from tests.unit import test_config_fuzz as fuzz

    counts = {"ok": 0, "refused": 0, "raw": 0}
    start = time.perf_counter()
    for path in fuzz._all_paths():
        for value in fuzz.HOSTILE:
            counts[fuzz._outcome(fuzz._with(path, value))[0]] += 1
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    return (f"config fuzz: every schema field x {len(fuzz.HOSTILE)} hostile values ({total} configs)",
            f"{counts['refused']} refused with a ConfigError naming path, value and fix; {counts['ok']} accepted "
            f"(documented classes); {counts['raw']} raw exceptions", f"{seconds / total * 1e3:.2f} ms per config")


def main() -> None:
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        root = Path(tmp)
        cases = _prepare_damaged(root / "damaged")
        per_rank = run_ranks(_load_faults, str(root / "damaged"), cases)
        for i, case in enumerate(cases):
            outcome = per_rank[0][i][1] if per_rank[0][i][1] == per_rank[1][i][1] else "DIFFERENT per rank"
            seconds = max(r[i][2] for r in per_rank)
            rows.append((f"load: damaged checkpoint ({case})", outcome, f"{seconds:.3f} s"))
        per_rank = run_ranks(_call_faults, str(root / "calls"))
        for i, (label, outcome, _) in enumerate(per_rank[0]):
            same = outcome == per_rank[1][i][1]
            rows.append((label, outcome if same else "DIFFERENT per rank", f"{max(r[i][2] for r in per_rank):.3f} s"))
        per_rank = run_ranks(_unused_fault)
        rows.append((per_rank[0][0], per_rank[0][1], f"{max(r[2] for r in per_rank):.3f} s"))
        rows += [(label, outcome, "-") for label, outcome in _nan_rows()]
        for mode in (False, True):
            rows.append((f"SIGKILL of rank 1 mid-shard, {'async' if mode else 'sync'} save",
                         _killed_save(root / f"killed-{mode}", mode), "-"))
    rows.append(_config_fuzz_row())
    lines = ["| fault | outcome on every rank | time to error |", "|---|---|---|"]
    for a, b, c in rows:
        b = b.replace(tmp, "<dir>").replace("|", "/")
        lines.append(f"| {a} | {b if len(b) < 230 else b[:227] + '...'} | {c} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"# Fault outcomes (benchmarks/bench_faults_data.py, 2 CPU ranks)\n\n{text}\n")


if __name__ == "__main__":
    main()
