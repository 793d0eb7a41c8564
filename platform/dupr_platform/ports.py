"""Free TCP ports for the servers started on one machine: a driver's own Ray instance, the
local stack's services, the tests' servers.

`bind(0)` picks from the kernel's ephemeral range, which the kernel also hands to every
outgoing connection. On a busy machine one of those can take the port between the check and
the server's own bind, and the server dies (a raylet with "Failed to start the grpc server",
a node that never joins). Below that range, and above Ray's worker ports (10002-19999 by
default), a port is only ever taken by a server that asks for it.
"""

from __future__ import annotations

import functools
import random
import socket
from pathlib import Path

_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 20000  # above Ray's default --max-worker-port
_handed_out: set[int] = set()  # a port goes to one server of this process only
_draw = random.SystemRandom()  # independent of a test's or a library's random.seed


@functools.cache  # the range is the machine's: read it once
def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, outside the range outgoing connections draw from."""
    highest = _ephemeral_start() - 1
    if highest - _LOWEST >= 1000:
        for _ in range(200):
            port = _draw.randint(_LOWEST, highest)
            if port in _handed_out:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as sock:  # an unusual port range: the kernel's choice
        sock.bind((host, 0))
        return sock.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server accepts connections on `port` now: a started service is up."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False
