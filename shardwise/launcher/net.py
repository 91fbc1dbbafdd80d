"""Small socket helpers for the launcher (standard library only): port numbers, loopback detection, port checks,
and a listening socket on a free port held until the rendezvous store takes it over."""

from __future__ import annotations

import ipaddress
import socket

__all__ = [
    "MAX_PORT", "PortError", "listen_on_free_port", "loopback_address", "parse_port", "port_is_free",
]

MAX_PORT = 65535


class PortError(ValueError):
    """A port number that is not one."""


def parse_port(text: str, flag: str = "--master_port", allow_zero: bool = False) -> int:
    """``text`` as a TCP port number (1-65535; 0 too with ``allow_zero``), or a :class:`PortError` saying so
    (argparse prefixes the message with the flag)."""
    low = 0 if allow_zero else 1
    try:
        port = int(str(text).strip())
    except ValueError:
        port = None
    if port is None or not low <= port <= MAX_PORT:
        raise PortError(f"{text!r} is not a TCP port: give a whole number from {low} to {MAX_PORT}"
                        + (" (0: a free port chosen when the job starts)" if allow_zero else f", or leave {flag} out"))
    return port


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


def listen_on_free_port(addr: str) -> socket.socket:
    """A listening TCP socket on a port the kernel picks: on ``addr`` when it is a loopback address, else on every
    interface of ``addr``'s family. Holding it from the choice of the port to the store's start leaves no window
    in which another job could take the port (nothing to retry)."""
    bind = loopback_address(addr)
    if bind is None:
        try:
            family = socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)[0][0]
        except OSError:
            family = socket.AF_INET
        bind = "::" if family == socket.AF_INET6 else "0.0.0.0"
    sock = socket.socket(_family(bind))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, 0))
    sock.listen(1024)
    return sock
