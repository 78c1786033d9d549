"""Bad input a new user sends to a replica, the gateway and the control plane, in-process.

Deeply nested JSON, wrong methods, batches with several bad rows, odd headers: each gets
a clear 4xx naming what is allowed, and none of them takes a replica out of rotation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response
from fastapi.testclient import TestClient
from pydantic import BaseModel
from readiness import wait_ready
from servers import ThreadServer

import anycast
from anycast.control.api import MAX_BODY_DEPTH
from anycast.control.api import build_app as build_control_app
from anycast.control.store import SQLiteStore
from anycast.core.config import ClusterConfig
from anycast.core.http import LOOPBACK, free_port
from anycast.gateway import Gateway, create_gateway_app
from anycast.replica import build_app
from anycast.replica.app import HandlerFastPath
from anycast.replica.inputs import MAX_JSON_DEPTH

ART = "d" * 64
DEEP = b"[" * 100_000 + b"]" * 100_000
JSON = {"content-type": "application/json"}


class Number(BaseModel):
    value: int


class Numbers(anycast.Service):
    @anycast.handler
    def half(self, request: Number) -> Number:
        return Number(value=request.value // 2)

    @anycast.handler(max_batch_size=16, max_wait_ms=1)
    def double(self, requests: list[Number]) -> list[Number]:
        return [Number(value=2 * request.value) for request in requests]


def wait_ready_at(url: str) -> None:
    wait_ready(lambda path: httpx.get(f"{url}{path}", timeout=5), timeout=20)


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[TestClient]:
    app = build_app(Numbers, tmp_path, replica_id="numbers-0", artifact_id="dev")
    with TestClient(HandlerFastPath(app)) as client:
        wait_ready(client.get, timeout=20)
        yield client


def _row(rid: str, port: int, region: str = "us-east") -> dict[str, Any]:
    endpoint = f"http://{LOOPBACK}:{port}"
    return {"id": rid, "deployment": "digits", "artifact": ART, "region": region,
            "endpoint": endpoint, "state": "ready"}  # fmt: skip


def _state(*rows: dict[str, Any]) -> dict[str, Any]:
    deployments = [{"name": "digits", "artifact": ART, "replicas": {}}]
    return {"revision": 5, "regions": [], "artifacts": [], "deployments": deployments,
            "replicas": list(rows)}  # fmt: skip


def _gateway(tmp_path: Path, *rows: dict[str, Any], **kwargs: Any) -> Gateway:
    """A gateway over ``rows``; its control plane never answers, so the rows stay."""
    dead_control = f"http://{LOOPBACK}:{free_port()}"
    config = ClusterConfig(home=tmp_path, simulate_latency=False)
    gateway = Gateway(config, control_url=dead_control, **kwargs)
    gateway.apply_state(_state(*rows))
    return gateway


# 1. Deeply nested JSON.


@pytest.mark.parametrize("handler", ["double", "half"])
def test_deeply_nested_json_is_a_400_stating_the_allowed_depth(
    replica: TestClient, handler: str
) -> None:
    answer = replica.post(f"/v1/{handler}", content=DEEP, headers=JSON)

    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "invalid_input"
    assert "request body is not valid JSON" in error["message"]
    assert f"more than {MAX_JSON_DEPTH} levels deep" in error["message"]
    assert replica.post(f"/v1/{handler}", json={"value": 4}).status_code == 200


def test_json_nested_within_the_limit_still_reaches_validation(replica: TestClient) -> None:
    body = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH

    answer = replica.post("/v1/double", content=body, headers=JSON)

    assert answer.status_code == 400
    assert "levels deep" not in answer.json()["error"]["message"]
    assert "row 0 must be a JSON object" in answer.json()["error"]["message"]


def test_deeply_nested_json_through_the_gateway_is_the_replicas_400(tmp_path: Path) -> None:
    app = build_app(Numbers, tmp_path, replica_id="numbers-0", artifact_id=ART)
    with ThreadServer(HandlerFastPath(app)) as server:
        wait_ready_at(server.url)
        gateway = _gateway(tmp_path, _row("us-1", server.port))
        with TestClient(create_gateway_app(gateway)) as client:
            answers = [
                client.post("/v1/deployments/digits/double", content=DEEP, headers=JSON)
                for _ in range(5)
            ]
            routes = client.get("/v1/routes").json()

    assert {a.status_code for a in answers} == {400}
    assert "levels deep" in answers[0].json()["error"]["message"]
    row = routes["deployments"]["digits"]["regions"]["us-east"][0]
    assert row["ejections"] == 0 and not row["ejected"]  # a caller's mistake: no ejection


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/artifacts"),
        ("PUT", "/v1/deployments/digits"),
        ("PUT", "/v1/regions/us-east"),
        ("POST", "/v1/deployments/digits/promote"),
    ],
)
def test_deeply_nested_json_to_the_control_plane_is_a_400(
    tmp_path: Path, method: str, path: str
) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    try:
        client = TestClient(build_control_app(store, ClusterConfig(home=tmp_path).regions))
        answer = client.request(method, path, content=DEEP, headers=JSON)
    finally:
        store.close()

    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "invalid_input"
    assert "not valid JSON" in error["message"] and "nest too deeply" in error["message"]


# 2. Wrong methods say which one is allowed.


def test_get_on_a_replica_handler_is_a_405_naming_post(replica: TestClient) -> None:
    answer = replica.get("/v1/half")

    assert answer.status_code == 405
    assert answer.headers["allow"] == "POST"
    error = answer.json()["error"]
    assert error["code"] == "method_not_allowed"
    assert error["message"] == "GET is not allowed on /v1/half; it takes POST"


def test_get_on_a_gateway_call_path_is_a_405_naming_post(tmp_path: Path) -> None:
    client = TestClient(create_gateway_app(_gateway(tmp_path)))

    answer = client.get("/v1/deployments/digits/predict")

    assert answer.status_code == 405
    assert answer.headers["allow"] == "POST"
    message = answer.json()["error"]["message"]
    assert message == "GET is not allowed on /v1/deployments/digits/predict; it takes POST"


# 3. Every bad row of a batch is named.


def test_a_batch_with_two_bad_rows_names_both_with_their_reasons(replica: TestClient) -> None:
    rows = [{"value": 1}, {"value": "many"}, {"nothing": 2}, {"value": 4}]

    answer = replica.post("/v1/double", json=rows)

    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert message.startswith("row 1: value: Input should be a valid integer")
    assert "; row 2: value: Field required" in message
    assert "(2 of 4 rows are invalid)" in message
    assert "row 0" not in message and "row 3" not in message


def test_a_batch_of_many_bad_rows_names_the_first_ten_and_counts_the_rest(
    replica: TestClient,
) -> None:
    answer = replica.post("/v1/double", json=[{"value": "x"}] * 13)

    message = answer.json()["error"]["message"]
    assert answer.status_code == 400
    assert "row 0: value" in message and "row 9: value" in message
    assert "row 10:" not in message
    assert "and 3 more bad rows (13 of 13 rows are invalid)" in message


@pytest.mark.parametrize("body", [b"42", b'"x"', b"null", b"true", b""])
def test_a_body_neither_object_nor_array_says_a_batched_handler_takes_both(
    replica: TestClient, body: bytes
) -> None:
    answer = replica.post("/v1/double", content=body, headers={"content-type": "application/json"})

    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert 'a JSON object like {"value": "<int>"}' in message
    assert "or a JSON array of 1 to 16 such objects" in message


# 4. Timeout and region headers, attempts.


def test_a_bad_timeout_header_says_larger_values_are_capped_at_the_deadline(
    tmp_path: Path,
) -> None:
    client = TestClient(create_gateway_app(_gateway(tmp_path)))

    bad = client.post("/v1/deployments/digits/x", json={}, headers={"X-Anycast-Timeout-Ms": "0"})
    large = client.post(
        "/v1/deployments/digits/x", json={}, headers={"X-Anycast-Timeout-Ms": "61000"}
    )

    assert bad.status_code == 400
    message = bad.json()["error"]["message"]
    assert "a value above the gateway's --deadline of 60000 ms is capped at it" in message
    assert "allows at most" not in message
    assert large.status_code == 503  # accepted (capped); no replica to serve it
    assert large.json()["error"]["code"] == "unavailable"


def test_a_non_ascii_region_is_echoed_as_the_caller_wrote_it(tmp_path: Path) -> None:
    client = TestClient(create_gateway_app(_gateway(tmp_path)))

    answer = client.post(
        "/v1/deployments/digits/x", json={}, headers={"X-Anycast-Region": "éu".encode()}
    )

    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert "unknown region 'éu' in X-Anycast-Region" in message
    assert "Ã" not in message


def test_a_call_past_its_deadline_after_one_try_says_1_attempt(tmp_path: Path) -> None:
    slow = FastAPI()

    @slow.get("/readyz")
    async def readyz() -> Response:
        return Response(status_code=200)

    @slow.post("/v1/{handler}")
    async def call(handler: str) -> Response:
        await asyncio.sleep(3)
        return Response(b"{}")

    with ThreadServer(slow) as server:
        gateway = _gateway(tmp_path, _row("us-1", server.port))
        with TestClient(create_gateway_app(gateway)) as client:
            headers = {"X-Anycast-Timeout-Ms": "300"}
            answer = client.post("/v1/deployments/digits/x", json={}, headers=headers)

    assert answer.status_code == 504
    message = answer.json()["error"]["message"]
    assert "the call's deadline of 300 ms passed after 1 attempt (" in message


def test_a_manifest_nested_past_the_limit_is_refused_and_the_state_still_reads(
    tmp_path: Path,
) -> None:
    nested: Any = "x"
    for _ in range(MAX_BODY_DEPTH + 5):
        nested = [nested]
    body = {"id": ART, "name": "digits", "version": "1", "manifest": {"deep": nested}}
    store = SQLiteStore(tmp_path / "state.db")
    try:
        client = TestClient(build_control_app(store, ClusterConfig(home=tmp_path).regions))
        answer = client.post("/v1/artifacts", json=body)
        state = client.get("/v1/state")
    finally:
        store.close()

    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert f"manifest: Value error, nests arrays or objects more than {MAX_BODY_DEPTH}" in message
    assert state.status_code == 200 and state.json()["artifacts"] == []
