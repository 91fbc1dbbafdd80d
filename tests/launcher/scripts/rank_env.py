"""A rank that joins the gloo group, checks an all-reduce and prints its launch environment.

Printed line: ``RANKINFO {json of string values}``. With CHECK_LISTEN=1 it also prints ``LISTEN ip:port`` for
every listening TCP socket of itself, its keeper and the launcher (which hosts the rendezvous store).
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=None)
args, extra = parser.parse_known_args()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
assert value.item() == world * (world + 1) / 2, (value.item(), world)

fields = {
    "rank": os.environ["RANK"],
    "local_rank": os.environ["LOCAL_RANK"],
    "world_size": os.environ["WORLD_SIZE"],
    "local_world_size": os.environ["LOCAL_WORLD_SIZE"],
    "local_size": os.environ.get("LOCAL_SIZE"),
    "cross_rank": os.environ.get("CROSS_RANK"),
    "master_addr": os.environ["MASTER_ADDR"],
    "arg_local_rank": args.local_rank,
    "extra": "|".join(extra),
    "from_env_file": os.environ.get("SW_TEST_FROM_ENV_FILE"),
    "dist_rank": rank,
    "allreduce": int(value.item()),
    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
}
lines = ["RANKINFO " + json.dumps({k: str(v) for k, v in fields.items()})]
if os.environ.get("CHECK_LISTEN"):
    import psutil

    keeper = psutil.Process().parent()  # the rank's keeper; its parent is the launcher
    for proc in (psutil.Process(), keeper, keeper.parent()):
        for conn in proc.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN:
                lines.append(f"LISTEN {conn.laddr.ip}:{conn.laddr.port} pid={proc.pid}")
dist.barrier()
sys.stdout.write("\n".join(lines) + "\n")
sys.stdout.flush()
dist.destroy_process_group()
