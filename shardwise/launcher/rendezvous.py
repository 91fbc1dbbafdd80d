"""The static rendezvous: a c10d ``TCPStore`` hosted by node 0's launcher, kept on loopback when it can be.

torch's built-in ``static`` rendezvous creates its ``TCPStore`` listening on every interface (``::``),
even for a single-node run. This handler does the same job (fixed node ranks, no etcd, workers reuse
the agent's store through ``TORCHELASTIC_USE_AGENT_STORE``) but, when the master address is a loopback
address, binds the listening socket to that address only, so a single-node job opens nothing on the
network. Multi-node jobs keep torch's behaviour (other nodes must reach the store). A single-node launcher that
chose a free port hands over the socket it already listens on (``listen_fd``), so no other process can take
the port in between.
"""

from __future__ import annotations

import datetime
import socket

from torch.distributed import PrefixStore, TCPStore
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from shardwise.launcher.net import loopback_address

__all__ = ["BACKEND_NAME", "LoopbackAwareStaticRendezvous", "register"]

BACKEND_NAME = "shardwise-static"
DEFAULT_TIMEOUT_SECONDS = 600


def _listening_socket(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr, port))
    except OSError as err:
        sock.close()
        raise RuntimeError(
            f"cannot listen on {addr}:{port} for the rendezvous ({err.strerror}); another job may be using "
            "the port: pass a free one with --master_port"
        ) from err
    sock.listen(1024)
    return sock


class LoopbackAwareStaticRendezvous(RendezvousHandler):
    """Fixed-membership rendezvous over a ``TCPStore`` on node 0 (see the module docstring)."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int, run_id: str, timeout: int,
                 listen_fd: int | None = None):
        self.master_addr = master_addr
        self.master_port = master_port
        self.rank = rank
        self.world_size = world_size
        self.run_id = run_id
        self.timeout = datetime.timedelta(seconds=timeout)
        self._store: TCPStore | None = None
        self._listen_fd = listen_fd
        self._bind = loopback_address(master_addr)
        if self._bind is not None:
            self.master_addr = self._bind  # workers connect to the exact address we listen on

    def get_backend(self) -> str:
        return BACKEND_NAME

    @property
    def use_agent_store(self) -> bool:
        return True

    def _create_store(self) -> TCPStore:
        is_master = self.rank == 0
        if is_master and (self._bind is not None or self._listen_fd is not None):
            fd, self._listen_fd = self._listen_fd, None
            if fd is None:
                fd = _listening_socket(self._bind, self.master_port).detach()
            # TCPStore takes ownership of the descriptor, so Python must not close it too.
            return TCPStore(
                self.master_addr,
                self.master_port,
                self.world_size,
                True,
                self.timeout,
                multi_tenant=True,
                master_listen_fd=fd,
            )
        return TCPStore(self.master_addr, self.master_port, self.world_size, is_master, self.timeout, multi_tenant=True)

    def next_rendezvous(self) -> RendezvousInfo:
        if self._store is None:
            self._store = self._create_store()
        store = PrefixStore(self.run_id, self._store)
        return RendezvousInfo(
            store, self.rank, self.world_size, RendezvousStoreInfo(self.master_addr, self.master_port)
        )

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


def _create(params: RendezvousParameters) -> RendezvousHandler:
    master_addr, master_port = parse_rendezvous_endpoint(params.endpoint, -1)
    if master_port == -1:
        raise ValueError(f"rendezvous endpoint {params.endpoint!r} has no port; pass --master_port")
    return LoopbackAwareStaticRendezvous(
        master_addr,
        master_port,
        int(params.config["rank"]),
        params.max_nodes,
        params.run_id,
        int(params.config.get("timeout", DEFAULT_TIMEOUT_SECONDS)),
        params.config.get("listen_fd"),
    )


def register() -> str:
    """Register the handler with torch's rendezvous registry (idempotent); returns its backend name."""
    rendezvous_handler_registry.register(BACKEND_NAME, _create)  # same creator again is a no-op
    return BACKEND_NAME
