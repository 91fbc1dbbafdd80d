"""Collective timeouts: where the value comes from and how bad values are refused (comm/timeouts.py,
config comms_config), the sentence naming the ranks that did not arrive (comm/arrivals.py), and the value reaching
the process group through ``initialize()`` and the environment (fresh one-rank interpreters)."""

import datetime
import subprocess
import sys
import textwrap

import pytest

from shardwise.comm import arrivals
from shardwise.comm.timeouts import DEFAULT_TIMEOUT, TimeoutSettingError, check_timeout, resolve_timeout
from shardwise.config import ConfigError, load_config
from shardwise.config.schema_comms import comms_timeout


def test_timeout_sources_in_order():
    assert resolve_timeout(None, {}) == (DEFAULT_TIMEOUT, "default")
    assert resolve_timeout(None, {"DEEPSPEED_TIMEOUT": "5"}) == (datetime.timedelta(minutes=5), "DEEPSPEED_TIMEOUT")
    both = {"SHARDWISE_COMM_TIMEOUT": "2.5", "DEEPSPEED_TIMEOUT": "5"}
    assert resolve_timeout(None, both) == (datetime.timedelta(seconds=2.5), "SHARDWISE_COMM_TIMEOUT")
    assert resolve_timeout(7, both)[0] == datetime.timedelta(seconds=7)
    assert resolve_timeout(datetime.timedelta(minutes=1), both)[0] == datetime.timedelta(minutes=1)
    assert resolve_timeout(None, {"SHARDWISE_COMM_TIMEOUT": " "})[1] == "default"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "SHARDWISE_COMM_TIMEOUT='abc' is not a number of seconds; set e.g. SHARDWISE_COMM_TIMEOUT=600"),
        ("0", "SHARDWISE_COMM_TIMEOUT='0': a collective timeout must be greater than 0 seconds"),
        ("-5", "SHARDWISE_COMM_TIMEOUT='-5': a collective timeout must be greater than 0 seconds"),
        ("nan", "SHARDWISE_COMM_TIMEOUT='nan' is not a number of seconds"),
        ("inf", "SHARDWISE_COMM_TIMEOUT='inf' is more than 30 days"),
        ("1e308", "SHARDWISE_COMM_TIMEOUT='1e308' is more than 30 days"),
    ],
)
def test_bad_environment_timeouts_are_refused_by_name(value, message):
    with pytest.raises(TimeoutSettingError) as err:
        resolve_timeout(None, {"SHARDWISE_COMM_TIMEOUT": value})
    assert message in str(err.value)


def test_bad_deepspeed_and_explicit_timeouts_are_refused():
    with pytest.raises(TimeoutSettingError, match=r"DEEPSPEED_TIMEOUT='x' is not a number of minutes; set e\.g\. "
                                                  r"DEEPSPEED_TIMEOUT=30"):
        resolve_timeout(None, {"DEEPSPEED_TIMEOUT": "x"})
    with pytest.raises(TimeoutSettingError, match=r"init_distributed\(timeout\)=datetime.timedelta\(days=-1.*greater"):
        resolve_timeout(datetime.timedelta(seconds=-1), {})
    with pytest.raises(TimeoutSettingError, match="not a number"):
        check_timeout(True, "x")


def test_config_key_is_validated_with_its_path():
    assert comms_timeout({}) is None and comms_timeout({"comms_config": {}}) is None
    assert comms_timeout({"comms_config": {"timeout": 90}}) == 90.0
    assert load_config({"train_batch_size": 2, "comms_config": {"timeout": 90}}).comms_config.timeout == 90.0
    for block, message in [
        ({"timeout": "abc"}, 'comms_config.timeout = "abc": expected a number'),
        ({"timeout": 0}, "comms_config.timeout = 0: expected a number > 0.0"),
        ({"timeout": -5}, "comms_config.timeout = -5: expected a number > 0.0"),
        ({"timeout": 1e308}, "comms_config.timeout = 1e+308: expected a number <= 2592000"),
        ({"timeuot": 5}, "comms_config.timeuot: unknown key. Fix: rename it to 'timeout'"),
        ([5], "comms_config = [5]: expected a JSON object"),
    ]:
        with pytest.raises(ConfigError) as err:
            comms_timeout({"comms_config": block})
        assert message in str(err.value)


def test_missing_ranks_sentence():
    text = arrivals.describe((0, 1, 2, 3), 12, "all_reduce", {0: (12, "all_reduce"), 1: (12, "all_reduce"),
                                                             3: (11, "barrier")}, 5.0)
    assert text == (
        "rank 2 did not arrive (no collective of this group timed out there within 5 s: computing, hung outside "
        "collectives, or stopped); rank 3 waits at barrier #11 of this group instead (the ranks issued this "
        "group's collectives in different orders); ranks 0, 1 reached all_reduce #12"
    )
    everyone = {r: (3, "broadcast") for r in range(2)}
    assert "every rank of the group reached broadcast #3" in arrivals.describe((0, 1), 3, "broadcast", everyone, 2)
    assert arrivals._parse(b"0:4:all_reduce;1:3:barrier;0:5:all_gather;") == {0: (5, "all_gather"), 1: (3, "barrier")}
    assert [arrivals.grace_seconds(t) for t in (3, 60, 1800)] == [2.0, 3.0, 30.0]


SCRIPT = textwrap.dedent(
    """
    import sys, json, torch
    import shardwise
    import torch.distributed as dist
    config = {"train_batch_size": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    if sys.argv[1] != "-":
        config["comms_config"] = json.loads(sys.argv[1])
    shardwise.initialize(model=torch.nn.Linear(2, 2), config=config)
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    print("TIMEOUT", backend.options._timeout.total_seconds())
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("block", "env", "expected"),
    [
        ('{"timeout": 77}', {"SHARDWISE_COMM_TIMEOUT": "33"}, "TIMEOUT 77.0"),  # the config wins
        ("-", {"SHARDWISE_COMM_TIMEOUT": "33"}, "TIMEOUT 33.0"),
        ("-", {"DEEPSPEED_TIMEOUT": "2"}, "TIMEOUT 120.0"),
        ('{"timeout": 0}', {}, "comms_config.timeout = 0: expected a number > 0.0"),
        ("-", {"SHARDWISE_COMM_TIMEOUT": "abc"}, "SHARDWISE_COMM_TIMEOUT='abc' is not a number of seconds"),
    ],
)
def test_timeout_reaches_the_process_group_from_initialize(block, env, expected, monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SHARDWISE_COMM_TIMEOUT",
                 "DEEPSPEED_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, block], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert expected in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expected.startswith("TIMEOUT")
