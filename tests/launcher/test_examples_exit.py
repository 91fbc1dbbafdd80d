"""A script that finished must exit 0, every time: each example (smallest settings) and a script ending right after
a collective are launched several times on 2 CPU ranks, and every run must exit 0 without the teardown abort
(``terminate called without an active exception``, SIGABRT; see [Note: teardown abort] in comm/teardown.py).
Slow by nature (each launch starts 2 interpreters); the tiny models are built once per session."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SCRIPTS = Path(__file__).parent / "scripts"
RUNS = 2  # per example; the bare script below runs more often (it is cheap)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The BLOOM and LLaMA example models, built once with a few training steps (generations need not be good)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from local_models import ensure_model
    finally:
        sys.path.remove(str(EXAMPLES))
    root = tmp_path_factory.mktemp("example-models")
    return {kind: ensure_model(kind, str(root / kind), train_steps=2) for kind in ("bloom", "llama")}


def _example_args(name: str, models: dict[str, str], out: Path) -> list[str]:
    return {
        "bloom_inference": ["--model_dir", models["bloom"], "--max_new_tokens", "4", "--batch_size", "2"],
        "llama_inference": ["--model_dir", models["llama"], "--max_new_tokens", "4"],
        "train_gpt": ["--deepspeed_config", str(EXAMPLES / "configs" / "zero1_fp32.json"), "--steps", "2",
                      "--n_layer", "1", "--n_embd", "32", "--save_dir", str(out / "gpt")],
        "llama_3d": ["--pp", "2", "--tp", "1", "--train-iters", "2"],
    }[name]


def _check_runs(run_cli, script: Path, args: list[str], runs: int, env) -> None:
    for run in range(1, runs + 1):
        proc = run_cli("-q", "--num_gpus", "2", str(script), *args, env=env, timeout=600)
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        assert proc.returncode == 0, f"{script.name} run {run}/{runs} exited {proc.returncode}:\n{tail}"
        assert "terminate called" not in proc.stderr, f"{script.name} run {run}/{runs}:\n{tail}"


@pytest.mark.parametrize("name", ["bloom_inference", "llama_inference", "train_gpt", "llama_3d"])
def test_every_example_exits_0_every_time(name, run_cli, launch_env, tiny_models, tmp_path):
    env = {**launch_env, "SHARDWISE_ACCELERATOR": "cpu"}
    _check_runs(run_cli, EXAMPLES / f"{name}.py", _example_args(name, tiny_models, tmp_path), RUNS, env)


def test_a_script_ending_on_a_collective_exits_0_every_time(run_cli, launch_env):
    _check_runs(run_cli, SCRIPTS / "last_collective.py", [], 4, {**launch_env, "SHARDWISE_ACCELERATOR": "cpu"})
