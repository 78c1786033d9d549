"""Fixtures shared by every test folder."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_block(size: int) -> int:
    """The first of ``size`` consecutive free ports on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        start = int(sock.getsockname()[1])
    for base in range(start, start + 2000):
        if base + size < 65000 and all(_port_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no block of free ports found")


@pytest.fixture
def port_block() -> int:
    """Eight consecutive free ports: control, gateway and region agents of a test cluster."""
    return free_port_block(8)


@pytest.fixture(scope="session")
def free_ports() -> Callable[[int], int]:
    """``free_port_block`` for fixtures wider than one test, which cannot take ``port_block``."""
    return free_port_block
