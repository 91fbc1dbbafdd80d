"""A job where one rank never reaches a collective: every rank all-reduces once, then rank ``--late_rank`` sleeps
while the others all-reduce again. Started with a short SHARDWISE_COMM_TIMEOUT, the waiting ranks time out and
their ``CollectiveError`` names the rank that did not arrive."""

import argparse
import time

import torch

import shardwise
from shardwise import comm

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=None)
parser.add_argument("--late_rank", type=int, required=True)
args = parser.parse_args()

shardwise.init_distributed()
value = torch.ones(4)
comm.all_reduce(value)
print(f"READY {comm.get_rank()}", flush=True)
if comm.get_rank() == args.late_rank:
    time.sleep(120)  # stopped by the launcher once a waiting rank fails
comm.all_reduce(value)
