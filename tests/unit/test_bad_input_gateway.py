"""The gateway over a real socket: bad call paths, and callers that break off or stall a body."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from anycast.core.config import ClusterConfig
from anycast.core.http import LOOPBACK, free_port
from anycast.core.names import HANDLER_RULE, NAME_RULE
from anycast.gateway import Gateway, create_gateway_app

STATE = {
    "revision": 1,
    "regions": [],
    "artifacts": [],
    "deployments": [{"name": "digits", "artifact": "d" * 64, "replicas": {}}],
    "replicas": [],
}
HEAD = (
    "POST /v1/deployments/digits/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
)


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A gateway on a free port that knows deployment ``digits``; bodies may stall 1 s."""
    monkeypatch.setenv("ANYCAST_BODY_TIMEOUT_S", "1")
    dead_control = f"http://{LOOPBACK}:{free_port()}"
    gw = Gateway(ClusterConfig(home=tmp_path), control_url=dead_control)
    port = free_port()
    config = uvicorn.Config(create_gateway_app(gw), host=LOOPBACK, port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.02)
    gw.apply_state(STATE)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize(
    "path",
    ["/v1/deployments/a/b/predict", "/v1/deployments//predict", "/v1/deployments/digits/x/y"],
)
def test_a_call_path_with_extra_or_empty_segments_states_the_allowed_form(
    gateway: int, path: str
) -> None:
    answer = httpx.post(f"http://{LOOPBACK}:{gateway}{path}", json={}, timeout=10)

    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "invalid_name"
    assert "calls go to /v1/deployments/NAME/HANDLER" in error["message"]
    assert NAME_RULE in error["message"] and HANDLER_RULE in error["message"]


def test_a_caller_hanging_up_mid_body_is_logged_once_without_a_traceback(
    gateway: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with socket.create_connection((LOOPBACK, gateway)) as sock:
        sock.sendall(HEAD.encode() + b'{"text": "a')

    deadline = time.monotonic() + 10
    while not any("closed the connection" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the hang-up was not logged"
        time.sleep(0.05)

    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert all(r.exc_info is None for r in caplog.records)
    hang_ups = [r for r in caplog.records if "closed the connection" in r.getMessage()]
    assert len(hang_ups) == 1 and hang_ups[0].levelno == logging.INFO


def test_a_stalled_body_gets_a_408_and_the_connection_closed(gateway: int) -> None:
    with socket.create_connection((LOOPBACK, gateway), timeout=20) as sock:
        sock.sendall(HEAD.encode() + b'{"text": "a')
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pytest.fail(f"the gateway held a stalled connection for 20 s; got {received!r}")

    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    error = json.loads(body)["error"]
    assert error["code"] == "body_timeout"
    assert "no byte for 1 s after 11 of 1000 bytes" in error["message"]
