"""Hostfile parsing, include/exclude filters, node/slot trimming and the world-info encoding (pure)."""

import pytest

from shardwise.launcher.hostfile import (
    HostfileError,
    decode_world_info,
    encode_world_info,
    fetch_hostfile,
    filter_resources,
    parse_hostfile,
    parse_node_specs,
    pool_from_slot_counts,
    select_resources,
    world_size,
)

HOSTFILE = """
# the cluster
worker-0 slots=4
worker-1 slots=4   # trailing comment

worker-2    slots=2
"""


@pytest.fixture
def pool():
    return pool_from_slot_counts(parse_hostfile(HOSTFILE))


def test_parse_keeps_order_and_skips_comments_and_blanks():
    assert list(parse_hostfile(HOSTFILE).items()) == [("worker-0", 4), ("worker-1", 4), ("worker-2", 2)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("worker-0 slots=4\nworker-1\n", r"hf:2: cannot parse 'worker-1'.*HOSTNAME slots=N"),
        ("worker-0 slots=four\n", r"hf:1: slots must be a positive integer, got 'four'"),
        ("worker-0 slots=0\n", r"hf:1: slots must be a positive integer, got '0'"),
        ("worker-0 slots=2\nworker-0 slots=2\n", r"hf:2: host 'worker-0' is listed twice"),
        ("# only comments\n\n", r"hf: no hosts found"),
        ("worker-0 slots=2 extra\n", r"hf:1: cannot parse"),
    ],
)
def test_malformed_hostfiles_name_the_line(text, message):
    with pytest.raises(HostfileError, match=message):
        parse_hostfile(text, source="hf")


def test_fetch_hostfile_missing_is_none_and_present_is_parsed(tmp_path):
    assert fetch_hostfile(str(tmp_path / "nope")) is None
    path = tmp_path / "hostfile"
    path.write_text("a slots=1\nb slots=3\n")
    assert fetch_hostfile(str(path)) == {"a": 1, "b": 3}


def test_node_specs_merge_sort_and_dedupe():
    assert parse_node_specs("worker-0@worker-1:2,0,2") == {"worker-0": [], "worker-1": [0, 2]}
    assert parse_node_specs("w0:1@w0:0") == {"w0": [0, 1]}
    assert parse_node_specs("w0@w0:1") == {"w0": [1]}  # DeepSpeed: a slot list narrows the host


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("w0@@w1", "empty host"),
        (":0", "missing host name"),
        ("w0:a", "slot 'a' on host 'w0' is not a non-negative integer"),
        ("w0:-1", "slot '-1'"),
        ("w0:", "slot ''"),
    ],
)
def test_bad_node_specs(spec, message):
    with pytest.raises(HostfileError, match=message):
        parse_node_specs(spec)


def test_include_hosts_and_slots(pool):
    assert filter_resources(pool, include="worker-0@worker-1:0,2") == {"worker-0": [0, 1, 2, 3], "worker-1": [0, 2]}
    # hostfile order wins over the filter's order
    assert list(filter_resources(pool, include="worker-2@worker-0:1")) == ["worker-0", "worker-2"]


def test_exclude_slots_and_hosts(pool):
    assert filter_resources(pool, exclude="worker-1:0") == {
        "worker-0": [0, 1, 2, 3],
        "worker-1": [1, 2, 3],
        "worker-2": [0, 1],
    }
    assert filter_resources(pool, exclude="worker-0@worker-2:0,1") == {"worker-1": [0, 1, 2, 3]}


def test_filters_do_not_mutate_the_pool(pool):
    before = {h: list(s) for h, s in pool.items()}
    filter_resources(pool, exclude="worker-1:0")
    filter_resources(pool, include="worker-1:0")
    assert pool == before


@pytest.mark.parametrize(
    ("include", "exclude", "message"),
    [
        ("worker-9", "", r"--include: host 'worker-9' is not in the hostfile \(known hosts: worker-0, worker-1"),
        ("worker-2:2", "", r"--include: host 'worker-2' has no slot\(s\) \[2\]; its slots are \[0, 1\]"),
        ("", "worker-9:0", r"--exclude: host 'worker-9' is not in the hostfile"),
        ("", "worker-0:4,5", r"--exclude: host 'worker-0' has no slot\(s\) \[4, 5\]"),
        ("worker-0", "worker-1", "mutually exclusive"),
    ],
)
def test_filter_errors(pool, include, exclude, message):
    with pytest.raises(HostfileError, match=message):
        filter_resources(pool, include=include, exclude=exclude)


def test_no_filter_is_a_copy(pool):
    assert filter_resources(pool) == pool
    assert filter_resources(pool) is not pool


def test_num_nodes_and_num_gpus_trim(pool):
    assert select_resources(pool, num_nodes=2) == {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3]}
    assert select_resources(pool, num_gpus=2) == {"worker-0": [0, 1], "worker-1": [0, 1], "worker-2": [0, 1]}
    assert select_resources(pool, num_nodes=1, num_gpus=3) == {"worker-0": [0, 1, 2]}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": "worker-0", "num_gpus": 1}, "cannot be combined with --include/--exclude"),
        ({"exclude": "worker-0", "num_nodes": 1}, "cannot be combined"),
        ({"num_nodes": 4}, r"--num_nodes 4 but the hostfile offers only 3 host\(s\)"),
        ({"num_gpus": 3}, r"--num_gpus 3 is more than the slots available \(worker-2 has 2\)"),
        ({"num_gpus": 0}, "at least 1"),
    ],
)
def test_selection_errors(pool, kwargs, message):
    with pytest.raises(HostfileError, match=message):
        select_resources(pool, **kwargs)


def test_excluding_everything_on_a_host_drops_it(pool):
    assert "worker-2" not in select_resources(pool, exclude="worker-2:0,1")
    assert world_size(select_resources(pool, exclude="worker-2:0,1")) == 8


def test_world_info_round_trip_is_deepspeed_encoding(pool):
    active = select_resources(pool, include="worker-1:0,2@worker-2")
    text = encode_world_info(active)
    # URL-safe base64 of the JSON, exactly like DeepSpeed's runner
    assert text == "eyJ3b3JrZXItMSI6IFswLCAyXSwgIndvcmtlci0yIjogWzAsIDFdfQ=="
    assert decode_world_info(text) == active
    assert list(decode_world_info(text)) == ["worker-1", "worker-2"]


@pytest.mark.parametrize("text", ["not base64!", encode_world_info({}), "eyJhIjogW119"])  # {"a": []}
def test_bad_world_info(text):
    with pytest.raises(HostfileError, match="world_info"):
        decode_world_info(text)
