"""A rank that starts a child process (``sleep``), records both pids, then either fails or waits.

Usage: ``hold.py --pid_dir DIR [--fail_rank R]``. Rank R raises ``RuntimeError("boom from rank R")``
after the group is up; every rank prints ``READY <rank>`` and the others sleep (so they only end when
the launcher stops them).
"""

import argparse
import os
import subprocess
import sys
import time

import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=None)
parser.add_argument("--pid_dir", required=True)
parser.add_argument("--fail_rank", type=int, default=-1)
args = parser.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
child = subprocess.Popen(["sleep", "120"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
with open(os.path.join(args.pid_dir, f"rank{rank}.pids"), "w") as handle:
    handle.write(f"{os.getpid()} {child.pid}\n")
sys.stdout.write(f"READY {rank}\n")
sys.stdout.flush()
if rank == args.fail_rank:
    raise RuntimeError(f"boom from rank {rank}")
time.sleep(120)  # ended by the launcher: the failing rank or the test's SIGINT stops the job
