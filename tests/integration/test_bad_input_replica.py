"""A real `anycast serve` replica and callers that break off or stall in the middle of a body."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cluster import TEXT_ECHO_SERVICE, Replica

from anycast.core.http import free_port

BODY_TIMEOUT_S = 2


HEAD = (
    "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    "Content-Length: 1000\r\n\r\n"
)


def send_part_of_a_body(port: int, path: str) -> socket.socket:
    """Announce 1000 body bytes, send 11 of them and keep the socket open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(HEAD.format(path=path).encode() + b'{"text": "a')
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or 30 s pass)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        received += b"<no close within 30 s>"
    return received


def json_body(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), raw
    assert b"connection: close" in head.lower()
    return json.loads(body)


def requests_with_status(replica: Replica, status: int) -> float:
    metrics = httpx.get(f"{replica.url}/metrics", timeout=10).text
    prefix = f'anycast_requests_total{{handler="predict",status="{status}"}} '
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[Replica]:
    """`anycast serve` of the echo service, with a body timeout of BODY_TIMEOUT_S."""
    (tmp_path / "service.py").write_text(TEXT_ECHO_SERVICE)
    port = free_port()
    args = ["anycast", "serve", "service.py:Echo", "--port", str(port)]
    env = {"ANYCAST_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
    served = Replica(args, port, tmp_path / "replica.log", env=env, cwd=tmp_path)
    served.wait_ready()
    yield served
    served.process.terminate()
    served.process.wait(timeout=30)


def test_a_caller_hanging_up_mid_body_is_one_log_line_and_a_499(replica: Replica) -> None:
    send_part_of_a_body(replica.port, "/v1/predict").close()

    deadline = time.monotonic() + 30
    while requests_with_status(replica, 499) < 1:
        assert time.monotonic() < deadline, f"no 499 counted:\n{replica.log}"
        time.sleep(0.1)

    assert requests_with_status(replica, 500) == 0
    assert "Traceback" not in replica.log and "ClientDisconnect" not in replica.log
    hang_ups = [line for line in replica.log.splitlines() if "closed the connection" in line]
    assert len(hang_ups) == 1 and " INFO " in hang_ups[0], replica.log
    assert "after 11 of 1000 body bytes" in hang_ups[0]
    served = httpx.post(f"{replica.url}/v1/predict", json={"text": "still here"}, timeout=10)
    assert served.json() == {"text": "still here"}


def test_a_stalled_body_gets_a_408_and_the_connection_closed(replica: Replica) -> None:
    with send_part_of_a_body(replica.port, "/v1/predict") as sock:
        answer = read_until_closed(sock)

    error = json_body(answer)["error"]
    assert error["code"] == "body_timeout"
    assert f"no byte for {BODY_TIMEOUT_S} s after 11 of 1000 bytes" in error["message"]
    assert requests_with_status(replica, 408) == 1
    assert "Traceback" not in replica.log
