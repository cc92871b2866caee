"""Listener addresses as `host:port` text: split one into its parts, join parts back, tell loopback apart, and
find one that cannot be bound before a process starts its listeners."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

__all__ = ["is_loopback", "join_address", "split_address", "unavailable_address"]


def split_address(address: str) -> tuple[str, int]:
    """`host:port` → (host, port); `[::1]:80` → ('::1', 80); an empty host means every interface ('0.0.0.0').

    Raises ValueError unless the port is an integer in 0..65535.
    """
    host, colon, port = address.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not colon or not 0 <= number <= 65535:
        raise ValueError(f"not host:port with a port in 0..65535: {address!r}")
    return host.strip("[]") or "0.0.0.0", number


def join_address(host: str, port: int) -> str:
    """(host, port) → `host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unavailable_address(addresses: Iterable[str]) -> str | None:
    """The first `host:port` (port 0 skipped) that cannot be bound now, with the reason; None when all can.

    Binds as gRPC does (SO_REUSEADDR), so a port left in TIME_WAIT counts as free and a listening one as busy.
    """
    for address in addresses:
        host, port = split_address(address)
        if port == 0:
            continue
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            return f"cannot listen on {address}: {reason}"
    return None
