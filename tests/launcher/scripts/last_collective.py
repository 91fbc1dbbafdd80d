"""A script whose last act is a collective: the ending most exposed to the teardown abort ([Note: teardown
abort] in shardwise/comm/teardown.py). Several all-gathers and all-reduces, then the interpreter exits."""

import argparse

import torch

import shardwise
from shardwise import comm

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=None)
parser.parse_args()

shardwise.init_distributed()
world = comm.get_world_size()
for step in range(20):
    value = torch.full((64,), float(step))
    parts = [torch.empty_like(value) for _ in range(world)]
    comm.all_gather(parts, value)
    comm.all_reduce(value)
