"""``shardwise.comm``: DeepSpeed's ``deepspeed.comm`` surface over torch.distributed, with a comms log.

Multi-node transport is torch.distributed's own; this package only adds discovery of the launcher's environment,
one owner for process groups (``topology.py``), and collectives that count bytes, explain timeouts, and skip
groups of one rank.
"""

from typing import Any

from shardwise.comm.collectives import (
    CollectiveError,
    Handle,
    ReduceOp,
    all_gather,
    all_gather_into_tensor,
    all_gather_object,
    all_reduce,
    all_to_all_single,
    barrier,
    broadcast,
    broadcast_object,
    irecv,
    isend,
    recv,
    reduce,
    reduce_scatter_tensor,
    send,
)
from shardwise.comm.comms_log import COMMS_LOG, CommsLog
from shardwise.comm.group import Group, as_group, world_group
from shardwise.comm.init import (
    destroy_process_group,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    is_initialized,
    launch_env,
)


def inference_all_reduce(tensor: Any, op: Any = None, group: Any = None) -> Any:
    """DeepSpeed's all-reduce for inference (in place, sum by default); here the same as :func:`all_reduce`."""
    return all_reduce(tensor, op=ReduceOp.SUM if op is None else op, group=group)


def log_summary(show_straggler: bool = False, return_dict: bool = False) -> dict | None:
    """Print the comms log as DeepSpeed's table (rank 0 prints; see ``comms_summary.py``).

    Every rank must call it when torch.distributed is up (it synchronises with barriers, and ``show_straggler``
    gathers every rank's rows to split each latency into the fastest rank's part and this rank's wait).
    With ``return_dict`` each rank returns ``{"summary", "straggler_analysis", "metadata"}`` for its own log.
    """
    from shardwise.comm import comms_summary

    table = comms_summary.summary()  # before the barriers below, which are logged too
    up = is_initialized()
    rank, world = (get_rank(), get_world_size()) if up else (0, 1)
    if up:
        barrier()
    straggler = None
    if show_straggler:
        tables = all_gather_object(table) if up else [table]
        straggler = comms_summary.stragglers(table, tables)
    if rank == 0:
        print(comms_summary.render(table))
        if straggler is not None:
            print(comms_summary.render_stragglers(straggler))
    if up:
        barrier()
    if not return_dict:
        return None
    return {"summary": table, "straggler_analysis": straggler, "metadata": comms_summary.metadata(rank, world)}


def configure(comms_logger_config=None, verbose: bool | None = None, prof_ops: list[str] | None = None) -> None:
    """Apply the ``comms_logger`` config section (verbose per-op logging, op filter)."""
    if comms_logger_config is not None:
        COMMS_LOG.verbose = bool(comms_logger_config.enabled and comms_logger_config.verbose)
        COMMS_LOG.prof_ops = tuple(comms_logger_config.prof_ops or ())
    if verbose is not None:
        COMMS_LOG.verbose = verbose
    if prof_ops is not None:
        COMMS_LOG.prof_ops = tuple(prof_ops)


__all__ = [
    "COMMS_LOG", "CollectiveError", "CommsLog", "Group", "Handle", "ReduceOp", "all_gather",
    "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all_single", "as_group", "barrier",
    "broadcast", "broadcast_object", "configure", "destroy_process_group", "get_local_rank", "get_rank",
    "get_world_size", "inference_all_reduce",
    "init_distributed", "irecv", "is_initialized", "isend", "launch_env", "log_summary", "recv",
    "reduce", "reduce_scatter_tensor", "send", "world_group",
]
