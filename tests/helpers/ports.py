"""Local TCP ports nobody listens on: the one place tests pick them (rendezvous, launchers, the SLURM test cluster)."""

from __future__ import annotations

import random
import socket

# A rendezvous that lost its port says so in one of these (torch's TCPStore, Python's socket errors).
PORT_TAKEN_MESSAGES = ("EADDRINUSE", "address already in use")


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default 32768-60999)."""
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def free_port() -> int:
    """A port nobody listens on now, drawn at random below the kernel's ephemeral range.

    Not the kernel's port-0 pick: that is an ephemeral port, which any outgoing connection (gloo opens
    many, and tests run side by side) may take between this look and the launcher's bind. Below the
    ephemeral range only another free_port call can collide, and the random draw over thousands of
    ports makes that rare; callers that start a rendezvous retry on PORT_TAKEN_MESSAGES all the same.
    A rendezvous port for a new process group, or a server address whose connections are refused at once.
    """
    low, _ = ephemeral_ports()
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not port_in_use(port):
            return port
    raise RuntimeError(f"no free port found below the ephemeral range ({low})")


def port_was_taken(stderr: str) -> bool:
    """Did a process fail because its rendezvous port was taken between free_port and its bind? Then retry."""
    return any(message in stderr for message in PORT_TAKEN_MESSAGES)


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
