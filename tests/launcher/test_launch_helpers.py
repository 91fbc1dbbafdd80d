"""Single-process checks of the launcher's pieces: env files, per-rank commands, core binding, node
plans, remote shell quoting, the loopback rendezvous store, and the import boundary."""

import ast
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from shardwise.launcher import launch, rank_keeper, runners
from shardwise.launcher.envfile import (
    EnvFileError,
    env_file_paths,
    forwarded_environment,
    load_env_files,
    parse_env_file,
)
from shardwise.launcher.hostfile import HostfileError, encode_world_info

LAUNCHER_DIR = Path(launch.__file__).parent


def test_parse_env_file_forms():
    text = "# comment\n\nA=1\nexport B = two words \nC='quoted value'\nD=\"x=y\"\nE=\nF=a'b\n"
    assert parse_env_file(text) == {"A": "1", "B": "two words", "C": "quoted value", "D": "x=y", "E": "", "F": "a'b"}


@pytest.mark.parametrize("line", ["JUSTANAME", "=value", "1ABC=x", "A B=c", "A-B=c"])
def test_parse_env_file_errors_name_file_and_line(line):
    with pytest.raises(EnvFileError, match=r"^envf:2: expected NAME=VALUE"):
        parse_env_file(f"OK=1\n{line}\n", source="envf")


def test_env_files_precedence(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    (home / ".deepspeed_env").write_text("A=home-ds\nB=home-ds\nC=home-ds\n")
    (home / ".shardwise_env").write_text("B=home-sw\n")
    (cwd / ".deepspeed_env").write_text("C=cwd-ds\n")
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    monkeypatch.delenv("SHARDWISE_ENV_FILE", raising=False)
    paths = env_file_paths(str(home), str(cwd))
    assert paths == [str(home / ".deepspeed_env"), str(home / ".shardwise_env"), str(cwd / ".deepspeed_env"),
                     str(cwd / ".shardwise_env")]  # fmt: skip
    merged, used = load_env_files(paths)
    assert merged == {"A": "home-ds", "B": "home-sw", "C": "cwd-ds"}
    assert used == paths[:3]
    monkeypatch.setenv("DS_ENV_FILE", "custom.env")  # DeepSpeed's override of the file name
    assert env_file_paths(str(home), str(cwd))[0] == str(home / "custom.env")


def test_forwarded_environment_prefixes():
    environ = {
        "NCCL_IB_HCA": "mlx5", "PYTHONPATH": "/x", "UCX_TLS": "tcp", "MV2_X": "1", "MLFLOW_URI": "u",
        "SHARDWISE_ACCELERATOR": "cpu", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "4",
        "GLOO_SOCKET_IFNAME": "eth1", "HOME": "/root", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0",
        "OMP_PROC_BIND": "x",
    }  # fmt: skip
    assert list(forwarded_environment(environ)) == [
        "DS_ACCELERATOR", "GLOO_SOCKET_IFNAME", "MLFLOW_URI", "MV2_X", "NCCL_IB_HCA", "OMP_NUM_THREADS",
        "PYTHONPATH", "SHARDWISE_ACCELERATOR", "UCX_TLS",
    ]  # fmt: skip


def _args(*extra):
    return launch.parse_args(["--world_info", encode_world_info({"h": [0, 1]}), *extra])


def test_worker_command_variants():
    py = sys.executable
    assert launch.worker_command(_args("train.py", "--lr", "1")) == [
        py, "-u", "train.py", "--local_rank=${local_rank}", "--lr", "1",
    ]  # fmt: skip
    assert launch.worker_command(_args("--module", "--no_local_rank", "pkg.train")) == [py, "-u", "-m", "pkg.train"]
    assert launch.worker_command(_args("--no_python", "./run.sh", "a")) == [
        "./run.sh",
        "--local_rank=${local_rank}",
        "a",
    ]
    # a literal '$' survives torch's ${local_rank} expansion (Template turns '$$' back into '$')
    assert launch.worker_command(_args("t.py", "cost=$5", "${local_rank}"))[-2:] == ["cost=$$5", "$${local_rank}"]
    with pytest.raises(SystemExit):
        _args("--module", "--no_python", "x")


def _as_started(cmd: list[str], local_rank: int) -> list[str]:
    """What torch runs for ``local_rank``: its macro expanded, ``$$`` back to ``$``."""
    return [a.replace("${local_rank}", str(local_rank)).replace("$$", "$") for a in cmd]


def test_bind_cores_keeper_pins_and_sets_omp():
    cores = sorted(os.sched_getaffinity(0))
    args = _args("--bind_cores_to_rank", "--no_python", "--no_local_rank", sys.executable)
    assert launch.bound_cores(args, len(cores)) == cores
    assert launch.bound_cores(_args("t.py"), 2) is None
    cmd = launch.kept_command(launch.worker_command(args), len(cores), cores, os.getpid())
    assert cmd[:4] == [sys.executable, "-I", "-S", rank_keeper.__file__]
    assert cmd[4:8] == [str(os.getpid()), "${local_rank}", str(len(cores)), ",".join(map(str, cores))]
    probe = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"
    last = len(cores) - 1
    out = subprocess.run([*_as_started(cmd, last), "-c", probe], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    assert out.strip() == f"[{cores[last]}] 1"
    with pytest.raises(ValueError, match=r"3 ranks but only 2 core\(s\) \[0, 1\]"):
        launch.bound_cores(_args("--bind_cores_to_rank", "--bind_core_list", "0-1", "t.py"), 3)


@pytest.mark.parametrize(
    ("code", "expected"),
    [("raise SystemExit(3)", 3), ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
     ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM), ("pass", 0)],
)
def test_keeper_ends_as_the_rank_ended(code, expected):
    """The launcher sees the rank's own exit code or signal through the keeper (SIGKILL included)."""
    cmd = launch.kept_command([sys.executable, "-c", code], 1, None, os.getpid())
    assert subprocess.run(_as_started(cmd, 0), timeout=30).returncode == expected


def test_keeper_refuses_to_start_a_rank_once_its_launcher_is_gone():
    """A keeper whose parent is not the launcher it was started for (the launcher died before the kernel could be
    told) kills its group at once instead of starting the rank."""
    cmd = launch.kept_command([sys.executable, "-c", "print('rank ran')"], 1, None, 1)  # pid 1: not our parent
    proc = subprocess.run(_as_started(cmd, 0), capture_output=True, text=True, timeout=30, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL and "rank ran" not in proc.stdout


def test_parse_core_list():
    assert launch.parse_core_list("0,2-4,7") == [0, 2, 3, 4, 7]
    assert launch.parse_core_list(None) == sorted(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="'x' is not N or N-M"):
        launch.parse_core_list("0,x")


def test_node_plan():
    world = {"a": [0, 1, 2], "b": [1, 3]}
    plan = launch.node_plan(world, 1)
    assert (plan.host, plan.slots, plan.first_rank, plan.world_size, plan.num_nodes) == ("b", (1, 3), 3, 5, 2)
    with pytest.raises(HostfileError, match=r"--node_rank 2 is out of range: the world info has 2 node\(s\) \(a, b\)"):
        launch.node_plan(world, 2)


def test_launch_main_reports_bad_input(capsys):
    assert launch.main(["train.py"]) == 2
    assert "--world_info is required" in capsys.readouterr().err
    assert launch.main([f"--world_info={encode_world_info({'a': [0]})}", "--node_rank=3", "train.py"]) == 2
    assert "--node_rank 3 is out of range" in capsys.readouterr().err


def test_remote_shell_command_quoting():
    cmd = runners.remote_shell_command("/w d", {"A": "x y", "B": "it's"}, ["py", "--node_rank=%n", "a b"])
    assert cmd == "cd '/w d' && export A='x y' B='it'\"'\"'s' && exec py --node_rank=%n 'a b'"
    assert shlex.split(cmd.split("exec ", 1)[1]) == ["py", "--node_rank=%n", "a b"]
    assert runners.remote_shell_command("/w", {}, ["py"]) == "cd /w && exec py"


def test_kill_commands_target_this_job_only():
    opts = runners.LaunchOptions(user_script="t.py", master_addr="h0")
    common = dict(opts=opts, active={"h0": [0], "h1": [0]}, world_info="WI", exports={}, cwd="/w")
    pattern = "shardwise.launcher.launch --world_info=WI --node_rank=[^ ]* --master_addr=h0 --master_port=29500( |$)"
    pdsh = runners.make_runner("pdsh", **common)
    assert pdsh.kill_commands() == [["pdsh", "-S", "-f", "1024", "-w", "h0,h1", f"pkill -f '{pattern}'"]]
    ssh = runners.make_runner("ssh", ssh_port=2022, **common)
    assert ssh.kill_commands()[1] == ["ssh", "-p", "2022", "h1", f"pkill -f '{pattern}'"]
    assert pdsh.environment() == {"PDSH_RCMD_TYPE": "ssh"}
    # the pattern matches this job's per-node command line and not one with another port
    line = shlex.join(runners.launch_command("WI", 1, opts))
    assert re.search(pattern, line)
    other = runners.LaunchOptions(user_script="t.py", master_addr="h0", master_port=29501)
    assert not re.search(pattern, shlex.join(runners.launch_command("WI", 1, other)))


def test_loopback_address_resolution():
    from shardwise.launcher.net import loopback_address

    assert loopback_address("127.0.0.1") == "127.0.0.1"
    assert loopback_address("localhost") == "127.0.0.1"
    assert loopback_address("::1") == "::1"
    assert loopback_address("192.0.2.1") is None  # documentation address: parsed, never contacted


def test_rendezvous_store_listens_on_loopback_only(free_port):
    from shardwise.launcher.rendezvous import LoopbackAwareStaticRendezvous

    port = free_port()
    handler = LoopbackAwareStaticRendezvous("localhost", port, rank=0, world_size=1, run_id="t", timeout=10)
    info = handler.next_rendezvous()
    info.store.set("k", "v")
    assert info.store.get("k") == b"v"
    assert (info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port) == ("127.0.0.1", port)
    listening = [
        c.laddr
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert [addr.ip for addr in listening] == ["127.0.0.1"]
    with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}.*pass a free one with --master_port"):
        LoopbackAwareStaticRendezvous("127.0.0.1", port, 0, 1, "t2", 10).next_rendezvous()


def test_launcher_imports_no_runtime():
    """The launcher only starts processes: it may import the stdlib, torch and itself, nothing else of ours."""
    for path in sorted(LAUNCHER_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in {"shardwise"} or name.startswith("shardwise.launcher"), (path.name, name)
                assert top not in {"psutil", "numpy", "pydantic", "deepspeed"}, (path.name, name)


class _Failure:
    def __init__(self, exitcode: int, timestamp: int = 1000) -> None:
        self.exitcode, self.timestamp = exitcode, timestamp


class _Err:
    def __init__(self, *failures: tuple[int, _Failure]) -> None:
        self.failures = dict(failures)  # torch's order: found failed first, then the ranks the agent stopped


class _Logs:
    def __init__(self, last: dict[int, float]) -> None:
        self.last = last

    def last_write(self, rank: int) -> float:
        return self.last.get(rank, float("inf"))


KILL, TERM, ABRT = -signal.SIGKILL, -signal.SIGTERM, -signal.SIGABRT


@pytest.mark.parametrize(
    ("failures", "last_write", "blamed"),
    [
        # the OOM killer takes rank 1; the agent then stops rank 0 (which had written to stderr before)
        ([(1, _Failure(KILL)), (0, _Failure(TERM))], {0: 5.0}, 1),
        # same poll: rank 0 saw the connection close and exited 1 (listed first), rank 1 was SIGKILLed
        ([(0, _Failure(1)), (1, _Failure(KILL))], {0: 9.0}, 1),
        # same poll: rank 1 raised, rank 0 aborted in gloo on the lost connection afterwards
        ([(0, _Failure(ABRT)), (1, _Failure(1))], {0: 9.0, 1: 8.0}, 1),
        # rank 2 raised; rank 0 ignored SIGTERM and was SIGKILLed by the agent 30 s later
        ([(2, _Failure(1)), (0, _Failure(KILL, 1031)), (1, _Failure(TERM, 1001))], {0: 1.0, 2: 3.0}, 2),
    ],
)
def test_root_cause_is_the_rank_that_failed_on_its_own(failures, last_write, blamed):
    rank, _ = launch._root_cause(_Err(*failures), _Logs(last_write))
    assert rank == blamed


def test_free_port_is_held_from_its_choice_to_the_store():
    """``--master_port 0``: the launcher listens on a kernel-chosen port and hands that socket to the store, so no
    other process can take the port in between (nothing to retry)."""
    from shardwise.launcher.net import listen_on_free_port

    sock = listen_on_free_port("127.0.0.1")
    try:
        addr, port = sock.getsockname()
        assert addr == "127.0.0.1" and port > 0
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # taken until the store (here: us) closes it
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass  # it is listening already
    finally:
        sock.close()
    plan = launch.node_plan({"a": [0], "b": [0]}, 0)
    with pytest.raises(ValueError, match="--master_port 0 \\(a free port\\) works only for a single-node job"):
        launch._reserve_port(launch.parse_args(["--world_info", "x", "--master_port", "0", "t.py"]), plan)


@pytest.mark.parametrize(("text", "ok"), [("1", 1), ("65535", 65535), (" 80 ", 80), ("0", None), ("65536", None),
                                          ("-1", None), ("8e3", None), ("", None)])
def test_parse_port(text, ok):
    from shardwise.launcher.net import PortError, parse_port

    if ok is None:
        with pytest.raises(PortError, match="is not a TCP port: give a whole number from 1 to 65535"):
            parse_port(text)
    else:
        assert parse_port(text) == ok
    assert parse_port("0", allow_zero=True) == 0
