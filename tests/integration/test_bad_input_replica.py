"""A real `anycast serve` replica and callers that break off or stall in the middle of a body."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from anycast.core.http import free_port

BODY_TIMEOUT_S = 2
READY_TIMEOUT = 90.0

ECHO_SERVICE = """
from pydantic import BaseModel

import anycast


class Text(BaseModel):
    text: str


class Echo(anycast.Service):
    @anycast.handler
    def predict(self, request: Text) -> Text:
        return request
"""

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


class ServeProcess:
    def __init__(self, folder: Path) -> None:
        (folder / "service.py").write_text(ECHO_SERVICE)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "replica.log"
        env = {**os.environ, "ANYCAST_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
        args = [sys.executable, "-m", "anycast", "serve", "service.py:Echo"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*args, "--port", str(self.port)], cwd=folder, stdout=log, stderr=log, env=env
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready():
            assert self.proc.poll() is None, self.log
            assert time.monotonic() < deadline, f"replica not ready:\n{self.log}"
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests_with_status(self, status: int) -> float:
        metrics = httpx.get(f"{self.url}/metrics", timeout=10).text
        prefix = f'anycast_requests_total{{handler="predict",status="{status}"}} '
        lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
        return float(lines[0].removeprefix(prefix)) if lines else 0.0


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[ServeProcess]:
    served = ServeProcess(tmp_path)
    yield served
    served.proc.terminate()
    served.proc.wait(timeout=30)


def test_a_caller_hanging_up_mid_body_is_one_log_line_and_a_499(replica: ServeProcess) -> None:
    send_part_of_a_body(replica.port, "/v1/predict").close()

    deadline = time.monotonic() + 30
    while replica.requests_with_status(499) < 1:
        assert time.monotonic() < deadline, f"no 499 counted:\n{replica.log}"
        time.sleep(0.1)

    assert replica.requests_with_status(500) == 0
    assert "Traceback" not in replica.log and "ClientDisconnect" not in replica.log
    hang_ups = [line for line in replica.log.splitlines() if "closed the connection" in line]
    assert len(hang_ups) == 1 and " INFO " in hang_ups[0], replica.log
    assert "after 11 of 1000 body bytes" in hang_ups[0]
    served = httpx.post(f"{replica.url}/v1/predict", json={"text": "still here"}, timeout=10)
    assert served.json() == {"text": "still here"}


def test_a_stalled_body_gets_a_408_and_the_connection_closed(replica: ServeProcess) -> None:
    with send_part_of_a_body(replica.port, "/v1/predict") as sock:
        answer = read_until_closed(sock)

    error = json_body(answer)["error"]
    assert error["code"] == "body_timeout"
    assert f"no byte for {BODY_TIMEOUT_S} s after 11 of 1000 bytes" in error["message"]
    assert replica.requests_with_status(408) == 1
    assert "Traceback" not in replica.log
