"""Ports for the servers started on one machine: none an outgoing connection can take first."""

import socket
from pathlib import Path

from dupr_platform import ports
from dupr_platform.ports import free_port


def test_ports_lie_below_the_ephemeral_range_and_are_handed_out_once():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    given = [free_port() for _ in range(100)]
    assert len(set(given)) == 100  # two servers of one process never get the same port
    assert all(20000 <= port < low for port in given), given
    with socket.socket() as sock:  # and one is free to bind
        sock.bind(("127.0.0.1", given[-1]))


def test_a_port_a_server_holds_is_skipped(monkeypatch):
    held_port, other = free_port(), free_port()
    draws = iter([held_port, held_port, other])
    monkeypatch.setattr(ports, "_draw", type("Draw", (), {"randint": lambda *_: next(draws)})())
    monkeypatch.setattr(ports, "_handed_out", set())
    with socket.socket() as held:
        held.bind(("127.0.0.1", held_port))
        held.listen()
        assert free_port() == other


def test_a_port_is_listening_while_a_server_accepts_on_it():
    port = free_port()
    assert not ports.listening(port)  # nothing there yet
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        assert not ports.listening(port)  # bound, not yet accepting
        server.listen()
        assert ports.listening(port)
    assert not ports.listening(port)
