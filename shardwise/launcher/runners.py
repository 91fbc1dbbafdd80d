"""Command builders: the per-node ``launch`` command and the multi-node runners (pdsh, ssh, openmpi, slurm).

Pure string/list building so every command can be unit-tested and printed by ``--dry_run``; running
them is ``cli.py``'s job. The pdsh and ssh runners start ``python -m shardwise.launcher.launch`` on each
node (which runs torch's elastic agent there); the MPI-style runners start the user script directly and
the ranks read their identity from ``OMPI_COMM_WORLD_*`` / ``SLURM_*`` variables.
"""

from __future__ import annotations

import abc
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardwise.launcher.hostfile import Pool, world_size

__all__ = [
    "LAUNCH_MODULE",
    "LaunchOptions",
    "MultiNodeRunner",
    "OpenMPIRunner",
    "PDSHRunner",
    "RUNNERS",
    "SSHRunner",
    "SlurmRunner",
    "UNSUPPORTED_LAUNCHERS",
    "launch_args",
    "launch_command",
    "make_runner",
    "remote_shell_command",
]

LAUNCH_MODULE = "shardwise.launcher.launch"
PDSH_MAX_FAN_OUT = 1024
UNSUPPORTED_LAUNCHERS = ("mpich", "impi", "mvapich", "jsrun")


@dataclass(frozen=True)
class LaunchOptions:
    """What to start on each node and how: the flags shared by the CLI and ``launch``."""

    user_script: str
    """The training script (or module with ``module``, or executable with ``no_python``)."""
    user_args: tuple[str, ...] = ()
    """Arguments passed through to the script, after ``--local_rank=N``."""
    master_addr: str = "127.0.0.1"
    """Address of node 0, where the rendezvous store listens."""
    master_port: int = 29500
    """Port of the rendezvous store on node 0."""
    module: bool = False
    """Run ``python -m user_script``."""
    no_python: bool = False
    """Execute ``user_script`` directly instead of through Python."""
    no_local_rank: bool = False
    """Do not append ``--local_rank=N`` to the script's arguments."""
    save_pid: int = 0
    """When non-zero, ``launch`` writes its pid to ``<tmp>/<save_pid>.deepspeed``."""
    enable_each_rank_log: str | None = None
    """Directory receiving one ``<timestamp>_rank<N>.log`` per rank instead of the console."""
    bind_cores_to_rank: bool = False
    """Pin each local rank to its own share of the CPU cores (sets OMP_NUM_THREADS to match)."""
    bind_core_list: str | None = None
    """Cores to share out when binding, e.g. ``0-3,8``; default all cores this process may use."""
    log_level: str | None = None
    """Launcher log level passed down to ``launch`` (``debug`` ... ``critical``; ``info`` is its default)."""
    python: str = field(default_factory=lambda: sys.executable)
    """Interpreter that runs ``launch`` and the ranks."""


def launch_command(world_info: str, node_rank: int | str, opts: LaunchOptions) -> list[str]:
    """The per-node command, DeepSpeed's launch interface:
    ``python -u -m shardwise.launcher.launch --world_info=.. --node_rank=K --master_addr=.. --master_port=..
    [flags] user_script user_args...``. ``node_rank`` may be pdsh's ``%n`` placeholder."""
    return [opts.python, "-u", "-m", LAUNCH_MODULE, *launch_args(world_info, node_rank, opts)]


def launch_args(world_info: str, node_rank: int | str, opts: LaunchOptions) -> list[str]:
    """The arguments of :func:`launch_command` after the module name (what ``launch.main`` parses)."""
    cmd = [
        f"--world_info={world_info}",
        f"--node_rank={node_rank}",
        f"--master_addr={opts.master_addr}",
        f"--master_port={opts.master_port}",
    ]
    flags = (
        ("--no_python", opts.no_python),
        ("--module", opts.module),
        ("--no_local_rank", opts.no_local_rank),
    )
    cmd += [flag for flag, on in flags if on]
    if opts.save_pid:
        cmd.append(f"--save_pid={opts.save_pid}")
    if opts.enable_each_rank_log:
        cmd.append(f"--enable_each_rank_log={opts.enable_each_rank_log}")
    if opts.bind_cores_to_rank:
        cmd.append("--bind_cores_to_rank")
    if opts.bind_core_list:
        cmd.append(f"--bind_core_list={opts.bind_core_list}")
    if opts.log_level and opts.log_level != "info":
        cmd.append(f"--log_level={opts.log_level}")
    return cmd + [opts.user_script, *opts.user_args]


def remote_shell_command(cwd: str, exports: Mapping[str, str], argv: Sequence[str]) -> str:
    """One shell string for a remote node: ``cd CWD && export K=V ... && exec ARGV``, all quoted.

    ``%n`` (pdsh's node-rank placeholder) survives quoting untouched."""
    parts = [f"cd {shlex.quote(cwd)}"]
    if exports:
        parts.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in exports.items()))
    parts.append("exec " + shlex.join(argv))
    return " && ".join(parts)


def _python_prefix(opts: LaunchOptions) -> list[str]:
    if opts.no_python:
        return []
    return [opts.python, "-u", *(["-m"] if opts.module else [])]


class MultiNodeRunner(abc.ABC):
    """Builds the command(s) that start a job on every host of ``active``.

    ``exports`` are set on every node; ``launcher_args`` (one string, shell-split) go right after the
    launcher's own flags. ``hostfile`` is the path the pool came from (MPI runners may pass it on).
    """

    name = "base"
    binary = ""
    #: True when the runner starts ``launch`` per node (so filters are expressed in world_info).
    per_node_launch = False

    def __init__(
        self,
        opts: LaunchOptions,
        active: Pool,
        world_info: str,
        exports: Mapping[str, str],
        cwd: str,
        launcher_args: str = "",
        hostfile: str | None = None,
        ssh_port: int | None = None,
    ) -> None:
        self.opts = opts
        self.active = active
        self.world_info = world_info
        self.exports = dict(exports)
        self.cwd = cwd
        self.launcher_args = shlex.split(launcher_args)
        self.hostfile = hostfile
        self.ssh_port = ssh_port

    @abc.abstractmethod
    def commands(self) -> list[list[str]]:
        """The processes to start locally, each an argv list (started together, waited for together)."""

    def labels(self) -> list[str]:
        """A short name for each command of :meth:`commands`, for messages."""
        return [self.name for _ in self.commands()]

    def environment(self) -> dict[str, str]:
        """Extra variables for the local runner process itself (not the ranks)."""
        return {}

    def kill_commands(self) -> list[list[str]]:
        """Commands that stop this job's processes on the remote nodes after Ctrl-C or a failure."""
        return []

    def _node_launch(self, node_rank: int | str) -> str:
        return remote_shell_command(self.cwd, self.exports, launch_command(self.world_info, node_rank, self.opts))

    def _kill_pattern(self) -> str:
        # pkill -f regex matching only this job's launch processes: same world info, master and port.
        return (
            f"{LAUNCH_MODULE} --world_info={self.world_info} --node_rank=[^ ]* "
            f"--master_addr={self.opts.master_addr} --master_port={self.opts.master_port}( |$)"
        )


class PDSHRunner(MultiNodeRunner):
    """``pdsh -S -f 1024 -w h1,h2 '<cd; export; launch --node_rank=%n ...>'`` (pdsh expands ``%n``)."""

    name = "pdsh"
    binary = "pdsh"
    per_node_launch = True

    def commands(self) -> list[list[str]]:
        hosts = ",".join(self.active)
        return [
            [
                "pdsh",
                "-S",
                "-f",
                str(PDSH_MAX_FAN_OUT),
                "-w",
                hosts,
                *self.launcher_args,
                self._node_launch("%n"),
            ]
        ]

    def environment(self) -> dict[str, str]:
        env = {"PDSH_RCMD_TYPE": "ssh"}
        if self.ssh_port is not None:
            env["PDSH_SSH_ARGS_APPEND"] = f"-p {self.ssh_port}"
        return env

    def kill_commands(self) -> list[list[str]]:
        hosts = ",".join(self.active)
        return [
            [
                "pdsh",
                "-S",
                "-f",
                str(PDSH_MAX_FAN_OUT),
                "-w",
                hosts,
                "pkill -f " + shlex.quote(self._kill_pattern()),
            ]
        ]


class SSHRunner(MultiNodeRunner):
    """One ``ssh [-p PORT] HOST '<cd; export; launch --node_rank=K ...>'`` per node, run in parallel."""

    name = "ssh"
    binary = "ssh"
    per_node_launch = True

    def _ssh(self, host: str) -> list[str]:
        port = ["-p", str(self.ssh_port)] if self.ssh_port is not None else []
        return ["ssh", *port, *self.launcher_args, host]

    def commands(self) -> list[list[str]]:
        return [[*self._ssh(host), self._node_launch(rank)] for rank, host in enumerate(self.active)]

    def labels(self) -> list[str]:
        return [f"ssh {host} (node {rank})" for rank, host in enumerate(self.active)]

    def kill_commands(self) -> list[list[str]]:
        return [[*self._ssh(host), "pkill -f " + shlex.quote(self._kill_pattern())] for host in self.active]


def _slots_per_host(runner: MultiNodeRunner) -> dict[str, int]:
    """Slot counts for MPI-style runners, which cannot choose device ids: each host's slots must be
    0..n-1 (after --num_gpus trimming) because ranks pick their device by local rank."""
    counts = {}
    for host, slots in runner.active.items():
        if slots != list(range(len(slots))):
            raise ValueError(
                f"--launcher {runner.name} starts ranks by count and cannot pick slots {slots} on {host!r}; "
                "include whole hosts (or use --num_gpus), or use --launcher pdsh/ssh for per-slot selection"
            )
        counts[host] = len(slots)
    return counts


class OpenMPIRunner(MultiNodeRunner):
    """``mpirun -n N --host h1:n1,h2:n2 -x VAR=.. python -u script``; ranks read ``OMPI_COMM_WORLD_*``.

    With no filter the hostfile is passed as ``-hostfile``; a filtered pool becomes ``--host``."""

    name = "openmpi"
    binary = "mpirun"

    def __init__(self, *args: Any, full_pool: Pool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full_pool = full_pool
        """Every slot of the hostfile: when nothing was filtered out, the hostfile is passed as is."""

    def commands(self) -> list[list[str]]:
        counts = _slots_per_host(self)
        if self.hostfile and self.full_pool is not None and self.active == self.full_pool:
            placement = ["-hostfile", self.hostfile]
        else:
            placement = ["--host", ",".join(f"{h}:{n}" for h, n in counts.items())]
        exports = {
            **self.exports,
            "MASTER_ADDR": self.opts.master_addr,
            "MASTER_PORT": str(self.opts.master_port),
        }
        export_args = [item for k, v in exports.items() for item in ("-x", f"{k}={v}")]
        return [
            ["mpirun", "-n", str(world_size(self.active)), *placement, *self.launcher_args, *export_args]
            + _python_prefix(self.opts)
            + [self.opts.user_script, *self.opts.user_args]
        ]


class SlurmRunner(MultiNodeRunner):
    """``srun -N nodes -n N --nodelist=h1,h2 --export=ALL,VAR=.. python -u script``.

    Ranks read their identity from ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NTASKS``."""

    name = "slurm"
    binary = "srun"

    def commands(self) -> list[list[str]]:
        counts = _slots_per_host(self)
        if len(set(counts.values())) != 1:
            raise ValueError(
                f"--launcher slurm needs the same number of ranks on every node, got {counts}; "
                "even them out with --num_gpus or --include, or use --launcher pdsh/ssh"
            )
        per_node = next(iter(counts.values()))
        cmd = [
            "srun",
            "-N",
            str(len(counts)),
            "-n",
            str(world_size(self.active)),
            f"--ntasks-per-node={per_node}",
        ]
        cmd.append("--nodelist=" + ",".join(counts))
        exports = {
            **self.exports,
            "MASTER_ADDR": self.opts.master_addr,
            "MASTER_PORT": str(self.opts.master_port),
        }
        # srun splits --export on commas, so a value containing one cannot be passed this way.
        bad = [k for k, v in exports.items() if "," in v]
        if bad:
            raise ValueError(
                f"--launcher slurm cannot export {bad}: values with ',' are split by srun --export; "
                "set them in the job script instead"
            )
        cmd += [
            *self.launcher_args,
            "--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in exports.items())]),
        ]
        return [cmd + _python_prefix(self.opts) + [self.opts.user_script, *self.opts.user_args]]


RUNNERS: dict[str, type[MultiNodeRunner]] = {
    cls.name: cls for cls in (PDSHRunner, SSHRunner, OpenMPIRunner, SlurmRunner)
}


def make_runner(name: str, **kwargs: Any) -> MultiNodeRunner:
    """Build the runner called ``name`` (case-insensitive); unknown or unsupported names raise ValueError."""
    key = name.lower()
    if key in UNSUPPORTED_LAUNCHERS:
        raise ValueError(
            f"--launcher {key} is not supported by shardwise; use pdsh or ssh (no MPI needed), "
            "or openmpi (mpirun) or slurm (srun)"
        )
    if key not in RUNNERS:
        raise ValueError(f"unknown --launcher {name!r}; choose one of {', '.join(RUNNERS)}")
    full_pool = kwargs.pop("full_pool", None)
    if key == "openmpi":
        return OpenMPIRunner(full_pool=full_pool, **kwargs)
    return RUNNERS[key](**kwargs)
