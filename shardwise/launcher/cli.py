"""The ``shardwise`` console script (also installed as ``deepspeed``): DeepSpeed's flags, our runners.

Decides *where* ranks run (hostfile, include/exclude, counts), then either runs this machine's share
in-process through ``launch.py`` (single node, or ``--no_ssh`` with ``--node_rank``), or starts a
multi-node runner (pdsh, ssh, openmpi, slurm) and supervises it: a failed node or Ctrl-C stops the
others (signals are forwarded and the runner's remote kill command is run). ``--dry_run`` prints the
commands instead. Imports nothing of shardwise's runtime; torch only to count local accelerators.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys

from shardwise.launcher import launch, rank_keeper
from shardwise.launcher.envfile import EnvFileError, forwarded_environment, load_env_files
from shardwise.launcher.hostfile import (
    DEFAULT_HOSTFILE,
    HostfileError,
    Pool,
    encode_world_info,
    fetch_hostfile,
    pool_from_slot_counts,
    select_resources,
    world_size,
)
from shardwise.launcher.net import PortError, loopback_address, parse_port, port_is_free
from shardwise.launcher.runners import (
    RUNNERS,
    LaunchOptions,
    MultiNodeRunner,
    launch_args,
    launch_command,
    make_runner,
)

__all__ = ["build_parser", "main", "main_deepspeed_alias"]

logger = logging.getLogger("shardwise.launcher")

DEFAULT_MASTER_PORT = 29500
_STOP_TIMEOUT = 30.0
_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _port_type(flag: str):
    def parse(text: str) -> int:
        try:
            return parse_port(text, flag)
        except PortError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _count(flag: str, what: str):
    """argparse type of ``--num_nodes``/``--num_gpus``: a whole number >= 1 (left out: every host / slot)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a count: give a whole number >= 1, or leave {flag} out to use every {what}"
            )
        return value

    return parse


def build_parser(prog: str = "shardwise") -> argparse.ArgumentParser:
    """The argument parser: DeepSpeed's runner flags, then ``user_script user_args...``."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Launch a multi-process (and multi-node) shardwise/DeepSpeed training job.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("-H", "--hostfile", default=DEFAULT_HOSTFILE, help="MPI-style hostfile ('host slots=N' lines)")
    add("-i", "--include", default="", help="resources to use: NODE[:SLOT,...][@NODE...], e.g. w0@w1:0,2")
    add("-e", "--exclude", default="", help="resources to leave out, same syntax as --include")
    add("--num_nodes", type=_count("--num_nodes", "host"), default=-1, help="use the first N hosts of the hostfile")
    add("--num_gpus", "--num_accelerators", type=_count("--num_gpus", "slot"), default=-1,
        help="ranks per node (slots 0..N-1)")
    add(
        "--master_port",
        type=_port_type("--master_port"),
        default=None,
        help=f"rendezvous port on node 0 (default: a free port on one node, {DEFAULT_MASTER_PORT} on several)",
    )
    add("--master_addr", default="", help="address of node 0 (default: 127.0.0.1 alone, else first host)")
    add("--node_rank", type=int, default=-1, help="this node's index; with --no_ssh")
    add("--launcher", default="pdsh", help=f"multi-node runner: {', '.join(RUNNERS)}")
    add("--launcher_args", default="", help="extra arguments for the runner, as one quoted string")
    add("--module", action="store_true", help="run user_script as a module (python -m)")
    add("--no_python", action="store_true", help="execute user_script directly, without python")
    add("--no_local_rank", action="store_true", help="do not pass --local_rank=N to the script")
    add("--no_ssh", action="store_true", help="run only this node's ranks (start each node yourself)")
    add("--no_ssh_check", action="store_true", help="accepted for compatibility; no ssh check is made")
    add("--force_multi", action="store_true", help="use the multi-node runner even for one host")
    add("--ssh_port", type=_port_type("--ssh_port"), default=None, help="ssh port for the pdsh/ssh runners")
    add("--save_pid", action="store_true", help="write the launcher pid to <tmp>/<pid>.deepspeed")
    add("--enable_each_rank_log", default=None, help="write each rank's output to DIR/<time>_rank<N>.log")
    add("--bind_cores_to_rank", action="store_true", help="pin each rank to its share of the CPU cores")
    add("--bind_core_list", default=None, help="cores to share out when binding, e.g. 0-15,32-47")
    add("--dry_run", action="store_true", help="print the commands that would run, then exit")
    add("--log_level", default="info", choices=launch.LOG_LEVELS, help="launcher log level")
    add("-q", "--quiet", action="store_true", help="same as --log_level error")
    # DeepSpeed flags we refuse with an explanation rather than argparse's "unrecognized arguments".
    add("--elastic_training", action="store_true", help=argparse.SUPPRESS)
    add("--autotuning", default=None, help=argparse.SUPPRESS)
    add("--min_elastic_nodes", type=int, default=None, help=argparse.SUPPRESS)
    add("--max_elastic_nodes", type=int, default=None, help=argparse.SUPPRESS)
    add("user_script", help="training script, followed by its arguments")
    add("user_args", nargs=argparse.REMAINDER, help="arguments for the training script")
    return p


class _UsageError(Exception):
    """A flag combination we refuse; the message says what to change."""


def _detect_local_slots() -> int:
    """How many ranks a bare ``shardwise script.py`` starts: one per visible accelerator, or 1 on CPU."""
    accel = (os.environ.get("SHARDWISE_ACCELERATOR") or os.environ.get("DS_ACCELERATOR") or "").lower()
    count = 0
    if accel != "cpu":
        try:
            import torch

            # device-agnostic (CUDA, ROCm, XPU, HPU when its plugin is loaded), without importing the runtime
            count = torch.accelerator.device_count() if hasattr(torch, "accelerator") else 0
        except Exception as err:  # a broken driver must not stop a CPU launch
            logger.debug("accelerator count failed: %s", err)
    if count == 0:
        logger.info("no accelerator found (or SHARDWISE_ACCELERATOR=cpu): starting 1 rank; use --num_gpus N for N")
        return 1
    return count


def _local_pool(args: argparse.Namespace) -> Pool:
    """The resource pool of a run without hostfile: ``localhost`` and its slots (DeepSpeed's rules)."""
    if args.num_nodes > 1:
        raise _UsageError(
            f"--num_nodes {args.num_nodes} needs a hostfile listing the nodes; none found at {args.hostfile}"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if visible:
        if args.include or args.exclude or args.num_nodes > 1 or args.num_gpus > 0:
            logger.info("ignoring CUDA_VISIBLE_DEVICES=%s: --include/--exclude/--num_gpus decide", visible)
        else:
            ids = [x.strip() for x in visible.split(",") if x.strip()]
            if not all(x.isdigit() for x in ids):
                raise _UsageError(
                    f"CUDA_VISIBLE_DEVICES={visible} is not a list of device numbers; "
                    "unset it and select devices with --include localhost:0,1"
                )
            logger.info("CUDA_VISIBLE_DEVICES=%s: using --include localhost:%s", visible, ",".join(ids))
            del os.environ["CUDA_VISIBLE_DEVICES"]
            return {"localhost": [int(x) for x in ids]}
        del os.environ["CUDA_VISIBLE_DEVICES"]
    count = args.num_gpus if args.num_gpus > 0 else _detect_local_slots()
    return {"localhost": list(range(count))}


def _resolve_resources(args: argparse.Namespace) -> tuple[Pool, Pool]:
    """(every slot on offer, the slots this job uses)."""
    counts = fetch_hostfile(args.hostfile)
    if counts is None:
        logger.warning("no hostfile at %s: running on this machine only", args.hostfile)
        pool = _local_pool(args)
    else:
        pool = pool_from_slot_counts(counts)
    return pool, select_resources(pool, args.include, args.exclude, args.num_nodes, args.num_gpus)


def _local_master_port(args: argparse.Namespace, addr: str) -> int:
    """The rendezvous port of a single-node run: the one asked for (refused if busy), else 0, which makes this
    node's launcher listen on a free port before anything else can take it (as ``torchrun --standalone``)."""
    if args.master_port is None:
        return 0
    if loopback_address(addr) is not None and not port_is_free(addr, args.master_port):
        raise _UsageError(f"--master_port {args.master_port} is in use on {addr}; pick another or omit it")
    return args.master_port


def _options(args: argparse.Namespace, master_addr: str, master_port: int) -> LaunchOptions:
    return LaunchOptions(
        user_script=args.user_script,
        user_args=tuple(args.user_args),
        master_addr=master_addr,
        master_port=master_port,
        module=args.module,
        no_python=args.no_python,
        no_local_rank=args.no_local_rank,
        save_pid=os.getpid() if args.save_pid else 0,
        enable_each_rank_log=args.enable_each_rank_log,
        bind_cores_to_rank=args.bind_cores_to_rank,
        bind_core_list=args.bind_core_list,
        log_level="error" if args.quiet else args.log_level,
    )


def _check_flags(args: argparse.Namespace) -> None:
    for name in ("elastic_training", "autotuning", "min_elastic_nodes", "max_elastic_nodes"):
        if getattr(args, name) not in (None, False):
            raise _UsageError(f"--{name} is not supported by shardwise; remove it (jobs run with a fixed world size)")
    if args.module and args.no_python:
        raise _UsageError("--module and --no_python cannot be used together")


def _print_command(env: dict[str, str], cmd: list[str]) -> None:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    print(f"{prefix} {shlex.join(cmd)}" if prefix else shlex.join(cmd), flush=True)


def _run_local(args: argparse.Namespace, active: Pool, env_vars: dict[str, str]) -> int:
    """This machine's ranks, in-process through launch.py (single node, or one node with --no_ssh)."""
    node_rank = max(args.node_rank, 0)
    if args.no_ssh:
        if not 0 <= args.node_rank < len(active):
            raise _UsageError(f"--no_ssh needs --node_rank between 0 and {len(active) - 1} (this node's index)")
        if len(active) > 1 and not args.master_addr:
            raise _UsageError("--no_ssh with several nodes needs --master_addr (the address of node 0)")
    master_addr = args.master_addr or "127.0.0.1"
    if len(active) == 1:
        master_port = _local_master_port(args, master_addr)
    else:
        master_port = args.master_port or DEFAULT_MASTER_PORT
    opts = _options(args, master_addr, master_port)
    world_info = encode_world_info(active)
    if args.dry_run:
        _print_command(env_vars, launch_command(world_info, node_rank, opts))
        return 0
    os.environ.update(env_vars)
    return launch.main(launch_args(world_info, node_rank, opts))


def _multi_node_exports(env_vars: dict[str, str]) -> dict[str, str]:
    """What every remote node gets: forwarded prefixes (cwd prepended to PYTHONPATH, as DeepSpeed) and
    the env files' variables."""
    environ = dict(os.environ)
    cwd = os.path.abspath(".")
    environ["PYTHONPATH"] = cwd + (":" + environ["PYTHONPATH"] if environ.get("PYTHONPATH") else "")
    return {**forwarded_environment(environ), **env_vars}


def _run_multi_node(args: argparse.Namespace, pool: Pool, active: Pool, env_vars: dict[str, str]) -> int:
    master_addr = args.master_addr or next(iter(active))
    opts = _options(args, master_addr, args.master_port or DEFAULT_MASTER_PORT)
    runner = make_runner(
        args.launcher,
        opts=opts,
        active=active,
        world_info=encode_world_info(active),
        exports=_multi_node_exports(env_vars),
        cwd=os.path.abspath("."),
        launcher_args=args.launcher_args,
        hostfile=os.path.abspath(args.hostfile),
        ssh_port=args.ssh_port,
        full_pool=pool,
    )
    commands = runner.commands()
    if args.dry_run:
        for cmd in commands:
            _print_command(runner.environment(), cmd)
        return 0
    if shutil.which(runner.binary) is None:
        raise _UsageError(f"--launcher {runner.name} needs '{runner.binary}' on PATH; install it or pick another")
    logger.info(
        "%s: %d rank(s) on %d node(s) (%s), master %s:%d",
        runner.name,
        world_size(active),
        len(active),
        ", ".join(active),
        opts.master_addr,
        opts.master_port,
    )
    return _supervise(runner, commands)


class _Interrupted(Exception):
    """Raised out of a blocking wait by the signal handler of :func:`_supervise`."""


def _stop_with_launcher() -> None:
    """In each runner process before exec: SIGTERM when this launcher dies, even by SIGKILL (Linux), so pdsh /
    ssh / mpirun / srun end their remote commands as on Ctrl-C instead of running on unattended."""
    rank_keeper.set_parent_death_signal(signal.SIGTERM)


def _supervise(runner: MultiNodeRunner, commands: list[list[str]]) -> int:
    """Run the runner's commands together; the first failure or signal stops the rest.

    Returns the exit code: 0, the first failure's code, or 128 + the signal received."""
    env = {**os.environ, **runner.environment()}
    procs = [subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_stop_with_launcher) for cmd in commands]
    labels = {proc.pid: label for proc, label in zip(procs, runner.labels())}
    received: list[int] = []

    def forward(signum, _frame):
        first = not received
        received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signum)
                except OSError:
                    pass
        if first:
            raise _Interrupted

    previous: dict[int, object] = {}
    code = 0
    try:
        try:
            previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED_SIGNALS}
            code = _wait_first_failure(procs, labels)
        except _Interrupted:
            logger.error("received %s: stopping every node", signal.Signals(received[0]).name)
        if received or code:
            _stop_all(runner, procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0] if received else code


def _wait_first_failure(procs: list[subprocess.Popen], labels: dict[int, str]) -> int:
    """Wait until every process succeeded (0) or one failed (its exit code, 128+N for signal N)."""
    pending = {proc.pid: proc for proc in procs}
    while pending:
        pid, status = os.wait()
        proc = pending.pop(pid, None)
        if proc is None:
            continue
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            logger.error("%s exited with %d: stopping the other nodes", labels[pid], proc.returncode)
            return proc.returncode if proc.returncode > 0 else 128 - proc.returncode
    return 0


def _stop_all(runner: MultiNodeRunner, procs: list[subprocess.Popen]) -> None:
    """SIGTERM the local runner processes, run the remote kill commands, SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except OSError:
                pass
    for cmd in runner.kill_commands():
        try:
            subprocess.run(cmd, env={**os.environ, **runner.environment()}, timeout=_STOP_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            logger.warning("remote kill command %s failed: %s", shlex.join(cmd), err)
    for proc in procs:
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None, prog: str = "shardwise") -> int:
    """Entry point of the ``shardwise`` console script; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    launch.configure_logging("error" if args.quiet else args.log_level)
    try:
        _check_flags(args)
        pool, active = _resolve_resources(args)
        env_vars, env_files = load_env_files()
        for path in env_files:
            logger.info("exporting the variables of %s to every rank", path)
        if (args.force_multi or len(active) > 1) and not args.no_ssh:
            return _run_multi_node(args, pool, active, env_vars)
        return _run_local(args, active, env_vars)
    except (_UsageError, HostfileError, EnvFileError, ValueError) as err:
        sys.stderr.write(f"{prog}: error: {err}\n")
        return 2


def main_deepspeed_alias(argv: list[str] | None = None) -> int:
    """The ``deepspeed`` console script: the same launcher under DeepSpeed's command name."""
    return main(argv, prog="deepspeed")


if __name__ == "__main__":
    sys.exit(main())
