"""Network probes shared by the target types' ``test_connection``."""

from __future__ import annotations

import socket

__all__ = ["tcp_reachable"]


def tcp_reachable(host: str, port: int, timeout: float = 5) -> bool:
    """Whether a TCP connection to ``host:port`` opens: mercure's "ping", without ICMP."""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False
