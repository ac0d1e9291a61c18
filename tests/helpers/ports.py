"""Local TCP ports nobody listens on: the one place tests pick them (rendezvous, launchers, the SLURM test cluster)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on now, the kernel's choice so that parallel runs do not collide.

    A rendezvous port for a new process group, or a server address whose connections are refused at once.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def consecutive_free_ports(count: int, attempts: int = 50) -> list[int]:
    """Ports that follow each other (slurm.conf gives several nodes one port range)."""
    for _ in range(attempts):
        first = free_port()
        ports = list(range(first, first + count))
        if ports[-1] < 65536 and not any(port_in_use(port) for port in ports):
            return ports
    raise RuntimeError(f"no {count} consecutive free ports found")
