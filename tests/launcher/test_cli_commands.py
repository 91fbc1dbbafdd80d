"""The CLI's decisions, checked in-process through ``--dry_run`` output (no process is started):
per-node launch commands, pdsh/ssh/openmpi/slurm command lines with hostfile filters, exported
environment, and the error messages for flag combinations we refuse."""

import os
import re
import shlex
import socket
import sys

import pytest

from shardwise.launcher import cli
from shardwise.launcher.envfile import EXPORT_NAMES, EXPORT_PREFIXES
from shardwise.launcher.hostfile import encode_world_info

PY = sys.executable
HOSTFILE = "# test cluster\nworker-0 slots=4\nworker-1 slots=4\nworker-2 slots=2\n"


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """cwd = tmp dir with a hostfile and a .deepspeed_env; HOME elsewhere; a known forwarded environment."""
    for name in list(os.environ):
        if name in EXPORT_NAMES or name.startswith(EXPORT_PREFIXES) or name in ("CUDA_VISIBLE_DEVICES",):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("UNRELATED_VAR", "not forwarded")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    (work / "hostfile").write_text(HOSTFILE)
    (work / ".deepspeed_env").write_text("SW_FILE_VAR=a b\n")
    monkeypatch.chdir(work)
    return work


def dry_run(capsys, *args):
    code = cli.main(["--dry_run", *args])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def remote(cwd, world, node_rank, tail="train.py --lr 0.1", master="worker-0"):
    """The shell string pdsh/ssh run on each node."""
    return (
        f"cd {cwd} && export NCCL_DEBUG=INFO OMP_NUM_THREADS=1 PYTHONPATH={cwd} SW_FILE_VAR='a b' && "
        f"exec {PY} -u -m shardwise.launcher.launch --world_info={encode_world_info(world)} "
        f"--node_rank={node_rank} --master_addr={master} --master_port=29500 {tail}"
    )


def test_single_node_runs_launch_locally(cluster, capsys, free_port):
    port = free_port()
    code, lines, err = dry_run(capsys, "--num_gpus", "2", "--master_port", str(port), "train.py", "--lr", "0.1")
    assert code == 0
    world = encode_world_info({"localhost": [0, 1]})
    assert lines == [
        f"SW_FILE_VAR='a b' {PY} -u -m shardwise.launcher.launch --world_info={world} --node_rank=0 "
        f"--master_addr=127.0.0.1 --master_port={port} train.py --lr 0.1"
    ]
    assert "no hostfile at /job/hostfile" in err  # DeepSpeed's default path, missing -> local run


def test_flags_reach_the_launch_command(cluster, capsys, free_port):
    port = free_port()
    code, (line,), _ = dry_run(
        capsys, "--num_accelerators", "1", "--master_port", str(port), "--module", "--no_local_rank",
        "--save_pid", "--enable_each_rank_log", "logs", "--bind_cores_to_rank", "--bind_core_list", "0-1",
        "-q", "pkg.train", "--x",
    )  # fmt: skip
    assert code == 0
    argv = shlex.split(line)
    flags = argv[argv.index(f"--master_port={port}") + 1 :]
    assert flags == [
        "--module", "--no_local_rank", f"--save_pid={os.getpid()}", "--enable_each_rank_log=logs",
        "--bind_cores_to_rank", "--bind_core_list=0-1", "--log_level=error", "pkg.train", "--x",
    ]  # fmt: skip


def test_cuda_visible_devices_becomes_the_slot_list(cluster, capsys, monkeypatch, free_port):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    code, (line,), _ = dry_run(capsys, "--master_port", str(free_port()), "train.py")
    assert code == 0
    assert f"--world_info={encode_world_info({'localhost': [2, 3]})}" in line


def test_pdsh_with_include(cluster, capsys):
    code, lines, _ = dry_run(capsys, "-H", "hostfile", "-i", "worker-0@worker-1:0,2", "train.py", "--lr", "0.1")
    assert code == 0
    world = {"worker-0": [0, 1, 2, 3], "worker-1": [0, 2]}
    assert [shlex.split(line) for line in lines] == [
        ["PDSH_RCMD_TYPE=ssh", "pdsh", "-S", "-f", "1024", "-w", "worker-0,worker-1", remote(cluster, world, "%n")]
    ]


def test_ssh_with_exclude_port_and_launcher_args(cluster, capsys):
    code, lines, _ = dry_run(
        capsys, "-H", "hostfile", "--launcher", "ssh", "-e", "worker-1:0@worker-2", "--ssh_port", "2222",
        "--launcher_args", "-o StrictHostKeyChecking=no", "train.py", "--lr", "0.1",
    )  # fmt: skip
    assert code == 0
    world = {"worker-0": [0, 1, 2, 3], "worker-1": [1, 2, 3]}
    ssh = ["ssh", "-p", "2222", "-o", "StrictHostKeyChecking=no"]
    assert [shlex.split(line) for line in lines] == [
        [*ssh, "worker-0", remote(cluster, world, 0)],
        [*ssh, "worker-1", remote(cluster, world, 1)],
    ]


def test_force_multi_and_master_addr(cluster, capsys):
    code, lines, _ = dry_run(
        capsys, "-H", "hostfile", "--num_nodes", "1", "--num_gpus", "2", "--force_multi",
        "--master_addr", "head", "train.py", "--lr", "0.1",
    )  # fmt: skip
    assert code == 0
    assert shlex.split(lines[0])[-1] == remote(cluster, {"worker-0": [0, 1]}, "%n", master="head")


def test_openmpi_whole_hostfile_and_trimmed(cluster, capsys):
    code, lines, _ = dry_run(capsys, "-H", "hostfile", "--launcher", "openmpi", "train.py", "--lr", "0.1")
    assert code == 0
    exports = [
        "-x",
        "NCCL_DEBUG=INFO",
        "-x",
        "OMP_NUM_THREADS=1",
        "-x",
        f"PYTHONPATH={cluster}",
        "-x",
        "SW_FILE_VAR=a b",
    ]
    master = ["-x", "MASTER_ADDR=worker-0", "-x", "MASTER_PORT=29500"]
    tail = [PY, "-u", "train.py", "--lr", "0.1"]
    assert [shlex.split(line) for line in lines] == [
        ["mpirun", "-n", "10", "-hostfile", str(cluster / "hostfile"), *exports, *master, *tail]
    ]
    code, lines, _ = dry_run(
        capsys, "-H", "hostfile", "--launcher", "OpenMPI", "--num_nodes", "2", "--num_gpus", "3",
        "--launcher_args", "--mca btl tcp,self", "train.py", "--lr", "0.1",
    )  # fmt: skip
    assert code == 0
    assert [shlex.split(line) for line in lines] == [
        ["mpirun", "-n", "6", "--host", "worker-0:3,worker-1:3", "--mca", "btl", "tcp,self", *exports, *master, *tail]
    ]


def test_slurm_with_include(cluster, capsys, monkeypatch):
    monkeypatch.delenv("NCCL_DEBUG")
    (cluster / ".deepspeed_env").write_text("")
    code, lines, _ = dry_run(
        capsys, "-H", "hostfile", "--launcher", "slurm", "-i", "worker-1@worker-0", "--launcher_args", "-p gpu",
        "--module", "pkg.train",
    )  # fmt: skip
    assert code == 0
    assert [shlex.split(line) for line in lines] == [
        [
            "srun", "-N", "2", "-n", "8", "--ntasks-per-node=4", "--nodelist=worker-0,worker-1", "-p", "gpu",
            f"--export=ALL,OMP_NUM_THREADS=1,PYTHONPATH={cluster},MASTER_ADDR=worker-0,MASTER_PORT=29500",
            PY, "-u", "-m", "pkg.train",
        ]
    ]  # fmt: skip


def test_no_ssh_runs_one_node_of_many(cluster, capsys):
    code, (line,), _ = dry_run(
        capsys, "-H", "hostfile", "--no_ssh", "--node_rank", "1", "--master_addr", "worker-0", "train.py"
    )
    assert code == 0
    argv = shlex.split(line)
    world = encode_world_info({"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0, 1]})
    assert argv == [
        "SW_FILE_VAR=a b", PY, "-u", "-m", "shardwise.launcher.launch", f"--world_info={world}", "--node_rank=1",
        "--master_addr=worker-0", "--master_port=29500", "train.py",
    ]  # fmt: skip


def test_deepspeed_alias_behaves_the_same(cluster, capsys):
    assert cli.main_deepspeed_alias(["-H", "hostfile", "--dry_run", "train.py"]) == 0
    alias = capsys.readouterr().out
    assert cli.main(["-H", "hostfile", "--dry_run", "train.py"]) == 0
    assert capsys.readouterr().out == alias
    assert cli.main_deepspeed_alias(["-H", "hostfile", "--launcher", "impi", "train.py"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("deepspeed: error: --launcher impi is not supported")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "worker-0", "-e", "worker-1"], "mutually exclusive"),
        (["-i", "worker-0", "--num_gpus", "1"], "cannot be combined with --include/--exclude"),
        (["-i", "worker-7"], "host 'worker-7' is not in the hostfile"),
        (["-i", "worker-2:5"], r"host 'worker-2' has no slot\(s\) \[5\]; its slots are \[0, 1\]"),
        (["--num_nodes", "5"], "offers only 3 host"),
        (["--launcher", "openmpi", "-e", "worker-0:1"], "cannot pick slots"),
        (["--launcher", "slurm"], "same number of ranks on every node"),
        (["--launcher", "mvapich"], "--launcher mvapich is not supported"),
        (["--launcher", "rsh"], "unknown --launcher 'rsh'"),
        (["--no_ssh"], "--no_ssh needs --node_rank between 0 and 2"),
        (["--no_ssh", "--node_rank", "1"], "--no_ssh with several nodes needs --master_addr"),
        (["--elastic_training"], "--elastic_training is not supported"),
        (["--module", "--no_python"], "cannot be used together"),
    ],
)
def test_refused_combinations_explain_themselves(cluster, capsys, args, message):
    code, _, err = dry_run(capsys, "-H", "hostfile", *args, "train.py")
    assert code == 2
    last = err.splitlines()[-1]
    assert last.startswith("shardwise: error: ")
    assert re.search(message, last), err


def test_bad_hostfile_and_env_file(cluster, capsys):
    (cluster / "bad").write_text("worker-0 slots=2\nworker-1 slot=2\n")
    code, _, err = dry_run(capsys, "-H", "bad", "train.py")
    assert code == 2 and "error: bad:2: cannot parse 'worker-1 slot=2'" in err
    (cluster / ".deepspeed_env").write_text("GOOD=1\nthis line is wrong\n")
    code, _, err = dry_run(capsys, "-H", "hostfile", "train.py")
    assert code == 2 and ".deepspeed_env:2: expected NAME=VALUE" in err


def test_num_nodes_without_hostfile(cluster, capsys):
    code, _, err = dry_run(capsys, "-H", "missing", "--num_nodes", "2", "train.py")
    assert code == 2 and "--num_nodes 2 needs a hostfile listing the nodes; none found at missing" in err


def test_single_node_without_master_port_listens_on_a_free_port_and_a_busy_explicit_port_is_refused(
    cluster, capsys
):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = dry_run(capsys, "--num_gpus", "1", "--master_port", str(port), "train.py")
        assert code == 2 and f"--master_port {port} is in use on 127.0.0.1" in err
    # no --master_port on one node: port 0 = this node's launcher listens on a free port and keeps it (no fixed
    # 29500 another job may hold, no window between choosing the port and binding it)
    code, (line,), _ = dry_run(capsys, "--num_gpus", "1", "train.py")
    assert code == 0 and "--master_port=0 " in line
    code, (line,), _ = dry_run(capsys, "--num_gpus", "1", "--no_ssh", "--node_rank", "0", "train.py")
    assert code == 0 and "--master_port=0 " in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--master_port", "70000"], "argument --master_port: '70000' is not a TCP port: give a whole number from 1 "
         "to 65535, or leave --master_port out"),
        (["--master_port", "0"], "argument --master_port: '0' is not a TCP port"),
        (["--master_port", "http"], "argument --master_port: 'http' is not a TCP port"),
        (["--ssh_port", "-22"], "argument --ssh_port: '-22' is not a TCP port"),
        (["--num_gpus", "-1"], "argument --num_gpus/--num_accelerators: '-1' is not a count: give a whole number "
         ">= 1, or leave --num_gpus out to use every slot"),
        (["--num_gpus", "0"], "'0' is not a count"),
        (["--num_nodes", "-1"], "argument --num_nodes: '-1' is not a count"),
    ],
)
def test_bad_numbers_are_refused_by_name(cluster, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "train.py"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_hostfile_that_is_a_directory_or_not_text_is_an_error_naming_it(cluster, capsys):
    (cluster / "hosts.d").mkdir()
    code, _, err = dry_run(capsys, "-H", "hosts.d", "train.py")
    assert code == 2 and "hostfile hosts.d is a directory; pass the file itself" in err
    (cluster / "latin1").write_bytes(b"# h\xf4te\nworker-0 slots=2\n")
    code, _, err = dry_run(capsys, "-H", "latin1", "train.py")
    assert code == 2 and "hostfile latin1 is not UTF-8 text (byte 3 is 0xf4)" in err
    (cluster / ".deepspeed_env").write_bytes(b"A=\xff\n")
    code, _, err = dry_run(capsys, "-H", "hostfile", "train.py")
    assert code == 2 and f"{cluster / '.deepspeed_env'} is not UTF-8 text (byte 2)" in err


def test_excluding_every_slot_is_a_user_facing_error(cluster, capsys):
    code, _, err = dry_run(capsys, "-H", "hostfile", "--exclude", "worker-0@worker-1@worker-2", "train.py")
    assert code == 2
    assert ("--exclude 'worker-0@worker-1@worker-2' leaves no slot to run on (on offer: worker-0:0,1,2,3, "
            "worker-1:0,1,2,3, worker-2:0,1); exclude fewer slots") in err
    code, _, err = dry_run(capsys, "-H", "missing", "--exclude", "localhost:0", "--master_port", "29999", "train.py")
    assert code == 2 and "--exclude 'localhost:0' leaves no slot to run on" in err and "world_info" not in err
