"""A rank that starts a child process (``sleep``), records its, the child's and its parent's (the launcher's rank
keeper) pids, then either fails or waits.

Usage: ``hold.py --pid_dir DIR [--fail_rank R] [--sigkill_rank R]``. Rank R raises ``RuntimeError("boom from rank
R")`` (or, with ``--sigkill_rank``, is killed by SIGKILL as the OOM killer would) after the group is up; every rank
prints ``READY <rank>`` and the others sleep (so they only end when the launcher stops them).
"""

import argparse
import os
import signal
import subprocess
import sys
import time

import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=None)
parser.add_argument("--pid_dir", required=True)
parser.add_argument("--fail_rank", type=int, default=-1)
parser.add_argument("--sigkill_rank", type=int, default=-1)
args = parser.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
child = subprocess.Popen(["sleep", "120"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
with open(os.path.join(args.pid_dir, f"rank{rank}.pids"), "w") as handle:
    handle.write(f"{os.getpid()} {child.pid} {os.getppid()}\n")  # the rank, its child, its keeper
sys.stdout.write(f"READY {rank}\n")
sys.stdout.flush()
if rank == args.fail_rank:
    raise RuntimeError(f"boom from rank {rank}")
if rank == args.sigkill_rank:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(120)  # ended by the launcher: the failing rank or the test's SIGINT stops the job
