"""Per-node launcher: start this node's ranks under torch's elastic agent (DeepSpeed's launch.py interface).

``python -m shardwise.launcher.launch --world_info=<b64 json> --node_rank=K --master_addr=A --master_port=P
[--no_local_rank] [--module] [--no_python] ... user_script user_args...`` is what the ``shardwise`` CLI runs
locally and what pdsh/ssh run on every node; it also works on its own.

Why torch's agent rather than our own Popen loop: it already watches every worker, ends the others
when one fails, forwards SIGINT/SIGTERM/SIGHUP to each worker's process group (workers run in their
own sessions, so their children go too) and escalates to SIGKILL after a grace period. We add the
DeepSpeed environment (LOCAL_SIZE, CROSS_RANK, CUDA_VISIBLE_DEVICES, ``--local_rank=N``), a rendezvous
that stays on loopback for local jobs (see ``rendezvous.py``), DeepSpeed-style logs (``rank_logs.py``),
a failure summary naming the rank that failed first and quoting its error, and a last sweep that
SIGKILLs anything the ranks started that is still alive (see ``_kill_leftovers``). Each rank is started through
``rank_keeper.py``, so that the ranks and what they started die with this process even when it is SIGKILLed
(which runs none of the above).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

from shardwise.launcher import deepspeed_shim, rank_keeper
from shardwise.launcher.hostfile import HostfileError, Pool, decode_world_info, world_size
from shardwise.launcher.net import PortError, listen_on_free_port, loopback_address, parse_port

__all__ = [
    "NodePlan",
    "bound_cores",
    "configure_logging",
    "kept_command",
    "main",
    "node_plan",
    "parse_args",
    "parse_core_list",
    "run",
    "worker_command",
]

logger = logging.getLogger("shardwise.launcher")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_MASTER_PORT = 29500
_LOCAL_RANK_MACRO = "${local_rank}"
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Inherited by every rank and its children: lets the final sweep find whatever this node started.
_MARKER_VAR = "SHARDWISE_LAUNCH_ID"


def _port_or_zero(text: str) -> int:
    try:
        return parse_port(text, allow_zero=True)
    except PortError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the per-node command line (DeepSpeed ``deepspeed.launcher.launch`` flags)."""
    parser = argparse.ArgumentParser(
        prog="python -m shardwise.launcher.launch",
        description="Start this node's ranks of a shardwise/DeepSpeed job under torch's elastic agent.",
    )
    parser.add_argument("--node_rank", type=int, default=0, help="index of this node in --world_info")
    parser.add_argument("--master_addr", default="127.0.0.1", help="address of node 0 (rendezvous host)")
    parser.add_argument("--master_port", type=_port_or_zero, default=DEFAULT_MASTER_PORT,
                        help="rendezvous port on node 0; 0 = a free port (single-node jobs)")
    parser.add_argument("--world_info", default="None", help="base64 JSON {host: [slot, ...]} from the CLI")
    parser.add_argument("--module", action="store_true", help="run user_script as a module (python -m)")
    parser.add_argument("--no_python", action="store_true", help="execute user_script directly, without python")
    parser.add_argument("--no_local_rank", action="store_true", help="do not append --local_rank=N")
    parser.add_argument("--save_pid", type=int, default=0, help="write this process's pid to <tmp>/<N>.deepspeed")
    parser.add_argument("--enable_each_rank_log", default="None", help="directory for per-rank log files")
    parser.add_argument("--bind_cores_to_rank", action="store_true", help="pin each rank to its share of cores")
    parser.add_argument("--bind_core_list", default=None, help="cores to share out, e.g. 0-3,8 (default: all)")
    parser.add_argument("--log_level", default="info", choices=LOG_LEVELS, help="launcher log level")
    parser.add_argument("-q", "--quiet", action="store_true", help="same as --log_level error")
    parser.add_argument("user_script", help="training script (or module / executable)")
    parser.add_argument("user_args", nargs=argparse.REMAINDER, help="arguments for the training script")
    args = parser.parse_args(argv)
    if args.module and args.no_python:
        parser.error("--module and --no_python cannot be used together")
    return args


@dataclass(frozen=True)
class NodePlan:
    """This node's share of the job, derived from the world info."""

    node_rank: int
    num_nodes: int
    host: str
    slots: tuple[int, ...]
    world_size: int
    first_rank: int


def node_plan(world: Pool, node_rank: int) -> NodePlan:
    """Where node ``node_rank`` sits in ``world``: its host, slots, and first global rank."""
    hosts = list(world)
    if not 0 <= node_rank < len(hosts):
        raise HostfileError(
            f"--node_rank {node_rank} is out of range: the world info has {len(hosts)} node(s) ({', '.join(hosts)})"
        )
    first = sum(len(world[h]) for h in hosts[:node_rank])
    host = hosts[node_rank]
    return NodePlan(node_rank, len(hosts), host, tuple(world[host]), world_size(world), first)


def parse_core_list(spec: str | None) -> list[int]:
    """``"0,2-4"`` -> ``[0, 2, 3, 4]``; ``None`` -> the cores this process may run on."""
    if not spec:
        return sorted(os.sched_getaffinity(0))
    cores: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"--bind_core_list {spec!r}: {part!r} is not N or N-M; write e.g. 0-3,8")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores


def worker_command(args: argparse.Namespace) -> list[str]:
    """The command each rank runs, with torch's ``${local_rank}`` macro where the local rank goes.

    A literal ``$`` in the user's script or arguments is doubled so the macro expansion leaves it alone.
    """
    cmd = [] if args.no_python else [sys.executable, "-u", *(["-m"] if args.module else [])]
    cmd.append(args.user_script.replace("$", "$$"))
    if not args.no_local_rank:
        cmd.append(f"--local_rank={_LOCAL_RANK_MACRO}")
    return cmd + [a.replace("$", "$$") for a in args.user_args]


def bound_cores(args: argparse.Namespace, nproc: int) -> list[int] | None:
    """The cores shared out among this node's ``nproc`` ranks with ``--bind_cores_to_rank``, else None."""
    if not args.bind_cores_to_rank:
        return None
    cores = parse_core_list(args.bind_core_list)
    if len(cores) < nproc:
        raise ValueError(
            f"--bind_cores_to_rank: {nproc} ranks but only {len(cores)} core(s) {cores}; "
            "use fewer ranks or a longer --bind_core_list"
        )
    return cores


def kept_command(cmd: list[str], nproc: int, cores: list[int] | None, launcher_pid: int) -> list[str]:
    """``cmd`` started through :mod:`rank_keeper` (the rank dies with the launcher ``launcher_pid``; it is pinned
    to its share of ``cores`` when given)."""
    spec = ",".join(map(str, cores)) if cores else "-"
    keeper = rank_keeper.__file__.replace("$", "$$")
    return [sys.executable, "-I", "-S", keeper, str(launcher_pid), _LOCAL_RANK_MACRO, str(nproc), spec, *cmd]


def _export_node_environment(plan: NodePlan, loopback: bool) -> None:
    """Variables every rank of this node inherits (torch's agent adds RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT per worker), including OMP_NUM_THREADS = usable cores / ranks
    when the user has not set it."""
    os.environ["LOCAL_SIZE"] = str(len(plan.slots))
    os.environ["CROSS_RANK"] = str(plan.node_rank)
    os.environ["CROSS_SIZE"] = str(plan.num_nodes)
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, plan.slots))
    if "OMP_NUM_THREADS" not in os.environ and len(plan.slots) > 1:
        # Like torchrun, never let the ranks of a node oversubscribe its cores with one OpenMP pool each; unlike
        # torchrun's fixed 1, give each rank its share, which is what CPU ranks need.
        per = max(1, len(os.sched_getaffinity(0)) // len(plan.slots))
        os.environ["OMP_NUM_THREADS"] = str(per)
        logger.info(f"OMP_NUM_THREADS={per} for each of the {len(plan.slots)} ranks of this node "
                    f"({len(os.sched_getaffinity(0))} usable cores); set OMP_NUM_THREADS to choose otherwise")
    if loopback and "lo" in {name for _, name in socket.if_nameindex()}:
        # Every node is on this machine: keep collective traffic on loopback too.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced later)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: str) -> None:
    """Send the launcher's log records to stderr at ``level`` (one of :data:`LOG_LEVELS`)."""
    if not logger.handlers:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("[shardwise.launcher] %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def _match_torch_logging() -> None:
    """torch's elastic loggers default to WARNING; follow ours when it is quieter or at debug."""
    ours = logger.getEffectiveLevel()
    level = logging.INFO if ours <= logging.DEBUG else max(logging.WARNING, ours)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(level)


def _run_id(args: argparse.Namespace) -> str:
    # Every node must use the same id (it prefixes the store keys); derive it from what they share.
    digest = hashlib.sha1(f"{args.world_info}|{args.master_addr}|{args.master_port}".encode()).hexdigest()
    return f"shardwise-{digest[:16]}"


def _processes_with_marker(marker: str) -> list[int]:
    """Pids (other than ours) whose environment holds ``SHARDWISE_LAUNCH_ID=marker`` (Linux /proc scan)."""
    needle = f"{_MARKER_VAR}={marker}".encode() + b"\0"
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle in handle.read() + b"\0":
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _kill_leftovers(marker: str) -> None:
    """SIGKILL every process this node started that is still alive once the agent is done.

    The agent only signals the process groups of workers that are still running, so the children of
    a rank that crashed (or that a finished rank left behind), and workers whose graceful shutdown
    was cut short by a third Ctrl-C, would otherwise outlive the job. They all inherited the marker.
    """
    for pid in _processes_with_marker(marker):
        logger.warning("process %d of this job is still running after shutdown; killing it", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


# What a rank's death by these signals usually means, for the failure summary.
_SIGNAL_HINTS = {
    int(signal.SIGKILL): "killed from outside the job, possibly by the out-of-memory killer: see `dmesg`, "
    "or the memory limit of the node or container",
    int(signal.SIGSEGV): "a crash in native code",
    int(signal.SIGABRT): "an abort in native code (its message is in the stderr lines below)",
    int(signal.SIGBUS): "a bad memory access, often a full /dev/shm",
}
# The signals torch's agent stops ranks with; SIGKILL only for a rank still running after a 30 s grace period.
_STOP_SIGNALS = {-int(signal.SIGTERM), -int(signal.SIGINT), -int(signal.SIGHUP)}
_ESCALATION_S = 20  # a SIGKILL recorded this long after the first failure is the agent's escalation


def _root_cause(err, logs) -> tuple[int, object]:
    """The failure that most likely started it all.

    torch's agent lists the ranks it found failed, in its dict of failures, before the ranks it then stopped; so
    the first entry always failed on its own. A later entry that ended with one of the agent's stop signals, or
    with a SIGKILL recorded long after the first failure (the agent's escalation), was stopped by the agent.
    Among ranks that failed on their own in the same poll, a SIGKILL comes first (no rank SIGKILLs itself because
    a peer failed, while a peer's lost connection can make a rank exit with an error, or even abort), then the
    one whose stderr was written last the earliest (victims write their "Connection closed" traceback after the
    crash that caused it).
    """
    items = list(err.failures.items())
    first_seen = items[0][1].timestamp

    def key(indexed):
        index, (rank, failure) = indexed
        killed = failure.exitcode == -int(signal.SIGKILL)
        escalated = killed and failure.timestamp - first_seen >= _ESCALATION_S
        stopped = index > 0 and (failure.exitcode in _STOP_SIGNALS or escalated)
        return (stopped, not killed, logs.last_write(rank), rank)

    return min(enumerate(items), key=key)[1]


def _report_failure(err, logs, plan: NodePlan) -> int:
    """Print which rank failed first and why; return the launcher's exit code."""
    rank, first = _root_cause(err, logs)
    out = [
        f"[shardwise.launcher] ERROR: rank {rank} (local rank {first.local_rank} on node {plan.node_rank} "
        f"'{plan.host}', pid {first.pid}) failed with {_describe_exit(first.exitcode)}"
        + (f" ({_SIGNAL_HINTS[-first.exitcode]})" if -first.exitcode in _SIGNAL_HINTS else "")
        + "; the other ranks were stopped."
    ]
    if first.error_file and os.path.isfile(first.error_file) and first.message:  # the rank used @record
        out.append(f"  error recorded by rank {rank}: {first.message}")
    tail = logs.stderr_tail(rank)
    if tail:
        out.append(f"  last lines of rank {rank}'s stderr:")
        out += [f"    {line}" for line in tail]
    log_file = logs.log_file(rank)
    if log_file:
        out.append(f"  full output of rank {rank}: {log_file}")
    for other, failure in sorted(err.failures.items()):
        if other != rank:
            out.append(f"  rank {other} ended with {_describe_exit(failure.exitcode)}")
    sys.stderr.write("\n".join(out) + "\n")
    sys.stderr.flush()
    code = first.exitcode
    return code if code > 0 else 128 + (-code if code < 0 else 1)


def _prepare_rank_log_dir(path: str) -> str:
    if os.path.isfile(path):
        raise ValueError(f"--enable_each_rank_log {path!r} is a file; give a directory")
    os.makedirs(path, exist_ok=True)
    return path


def _write_pid_file(save_pid: int) -> str | None:
    if not save_pid:
        return None
    path = os.path.join(tempfile.gettempdir(), f"{save_pid}.deepspeed")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(str(os.getpid()))
    logger.info("launcher pid %d written to %s", os.getpid(), path)
    return path


def _reserve_port(args: argparse.Namespace, plan: NodePlan) -> int | None:
    """With ``--master_port 0``: listen on a free port now and make it the master port; returns the listening
    descriptor for the rendezvous store (None when the port was given)."""
    if args.master_port != 0:
        return None
    if plan.num_nodes != 1:
        raise ValueError(
            f"--master_port 0 (a free port) works only for a single-node job, not {plan.num_nodes} nodes: the other "
            "nodes must know the port in advance; pass one, e.g. --master_port 29500"
        )
    sock = listen_on_free_port(args.master_addr)
    args.master_port = sock.getsockname()[1]
    return sock.detach()


def _launch_config(args: argparse.Namespace, plan: NodePlan, logs, listen_fd: int | None = None):
    """torch's LaunchConfig for this node: fixed membership, no restarts, our rendezvous and logs."""
    from torch.distributed.launcher.api import LaunchConfig

    from shardwise.launcher import rendezvous

    host = f"[{args.master_addr}]" if ":" in args.master_addr else args.master_addr
    return LaunchConfig(
        min_nodes=plan.num_nodes,
        max_nodes=plan.num_nodes,
        nproc_per_node=len(plan.slots),
        logs_specs=logs,
        run_id=_run_id(args),
        role="default",
        rdzv_endpoint=f"{host}:{args.master_port}",
        rdzv_backend=rendezvous.register(),
        rdzv_configs={"rank": plan.node_rank, "timeout": rendezvous.DEFAULT_TIMEOUT_SECONDS, "listen_fd": listen_fd},
        max_restarts=0,
        monitor_interval=0.1,
    )


def run(args: argparse.Namespace) -> int:
    """Start and supervise this node's ranks.

    Returns the exit code: 0, the failing rank's code, or 128 + the signal that stopped the node."""
    if args.world_info == "None":
        raise HostfileError("--world_info is required (the shardwise CLI computes it from the hostfile)")
    plan = node_plan(decode_world_info(args.world_info), args.node_rank)
    nproc = len(plan.slots)
    cmd = kept_command(worker_command(args), nproc, bound_cores(args, nproc), os.getpid())
    rank_log_dir = None if args.enable_each_rank_log in ("None", "", None) else args.enable_each_rank_log
    if rank_log_dir:
        _prepare_rank_log_dir(rank_log_dir)

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from shardwise.launcher.rank_logs import RankLogs

    _match_torch_logging()
    listen_fd = _reserve_port(args, plan)
    loopback = loopback_address(args.master_addr) is not None
    _export_node_environment(plan, loopback)
    marker = os.environ[_MARKER_VAR] = uuid.uuid4().hex
    work_dir = tempfile.mkdtemp(prefix="shardwise-launch-")
    deepspeed_shim.prepare(work_dir)  # `import deepspeed` in the ranks gives shardwise (unless a real one is there)
    logs = RankLogs(work_dir, rank_log_dir, time.strftime("%Y%m%d%H%M%S", time.localtime()))
    config = _launch_config(args, plan, logs, listen_fd)
    last = plan.first_rank + len(plan.slots) - 1
    logger.info(
        f"node {plan.node_rank}/{plan.num_nodes} ({plan.host}): ranks {plan.first_rank}..{last} of "
        f"{plan.world_size}, slots {list(plan.slots)}, rendezvous {args.master_addr}:{args.master_port}"
        + (" (loopback only)" if loopback else "")
    )
    pid_file = _write_pid_file(args.save_pid)
    original_handlers = {sig: signal.getsignal(sig) for sig in _HANDLED_SIGNALS}  # torch replaces them
    try:
        elastic_launch(config, cmd[0])(*cmd[1:])
        return 0
    except ChildFailedError as err:
        logs.stop()
        return _report_failure(err, logs, plan)
    except SignalException as err:
        logger.error("received %s: stopped all ranks of node %d", err.sigval.name, plan.node_rank)
        return 128 + int(err.sigval)
    except KeyboardInterrupt:  # Ctrl-C before the agent installed its handlers (e.g. during rendezvous)
        logger.error("interrupted: stopped node %d", plan.node_rank)
        return 128 + int(signal.SIGINT)
    finally:
        # Finish the cleanup even if another signal arrives (torch's handlers would raise mid-way),
        # then put back the handlers we started with, not torch's.
        for sig in _HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        _kill_leftovers(marker)
        logs.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
        if pid_file and os.path.isfile(pid_file):
            os.remove(pid_file)
        for sig, handler in original_handlers.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m shardwise.launcher.launch``; returns the process exit code."""
    args = parse_args(argv)
    configure_logging("error" if args.quiet else args.log_level)
    try:
        return run(args)
    except (HostfileError, ValueError, RuntimeError) as err:
        sys.stderr.write(f"[shardwise.launcher] ERROR: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
