"""Small socket helpers for the launcher (standard library only): loopback detection and port checks."""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["free_port", "loopback_address", "port_is_free"]


def loopback_address(host: str) -> str | None:
    """The loopback IP ``host`` resolves to (IPv4 preferred), or ``None`` if any of its addresses is
    not loopback or it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    addrs = [info[4][0] for info in infos]
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        return None
    return next((a for a in addrs if ":" not in a), addrs[0])


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def port_is_free(addr: str, port: int) -> bool:
    """Whether a listening socket could bind ``addr:port`` now (with SO_REUSEADDR, as the store does)."""
    with socket.socket(_family(addr)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
        except OSError:
            return False
    return True


def free_port(addr: str) -> int:
    """A port the kernel reports free on ``addr`` right now."""
    with socket.socket(_family(addr)) as sock:
        sock.bind((addr, 0))
        return sock.getsockname()[1]
