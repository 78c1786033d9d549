"""Handler calls as a replica process serves them: straight to their endpoint, past FastAPI.

The same answers as through the FastAPI app (tests/unit/test_replica_app.py): JSON bodies,
the replica's identity on every response, JSON errors, metrics, probes and docs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel
from readiness import wait_ready

import anycast
from anycast.core.errors import InvalidInput
from anycast.replica.app import HandlerFastPath, build_app


class Number(BaseModel):
    value: int


class Numbers(anycast.Service):
    @anycast.handler
    def half(self, request: Number) -> Number:
        if request.value % 2:
            raise InvalidInput(f"value must be even, got {request.value}")
        return Number(value=request.value // 2)

    @anycast.handler
    def crash(self, request: Number) -> Number:
        raise ZeroDivisionError("oops")

    @anycast.handler(max_batch_size=8, max_wait_ms=1)
    def double(self, requests: list[Number]) -> list[Number]:
        return [Number(value=2 * request.value) for request in requests]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app = build_app(Numbers, tmp_path, replica_id="numbers-0", artifact_id="dev")
    with TestClient(HandlerFastPath(app)) as test_client:
        wait_ready(test_client.get, timeout=10)
        yield test_client


def test_a_call_is_answered_in_json_naming_the_replica(client: TestClient) -> None:
    response = client.post("/v1/half", json={"value": 8})
    assert response.status_code == 200
    assert response.json() == {"value": 4}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-anycast-replica"] == "numbers-0"
    assert response.headers["x-anycast-artifact"] == "dev"


def test_bad_input_and_handler_refusals_are_json_4xx_naming_the_replica(
    client: TestClient,
) -> None:
    bad = client.post("/v1/half", json={"value": "eight"})
    refused = client.post("/v1/half", json={"value": 3})
    for response in (bad, refused):
        assert response.status_code == 400
        assert response.headers["x-anycast-replica"] == "numbers-0"
    assert "value" in bad.json()["error"]["message"]
    assert refused.json()["error"]["message"] == "value must be even, got 3"


def test_a_crashing_handler_is_a_json_500_without_the_traceback(client: TestClient) -> None:
    response = client.post("/v1/crash", json={"value": 1})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "handler_error"
    assert "ZeroDivisionError" in response.json()["error"]["message"]
    assert "Traceback" not in response.text


def test_batched_calls_answer_one_row_or_an_array(client: TestClient) -> None:
    assert client.post("/v1/double", json={"value": 2}).json() == {"value": 4}
    rows = client.post("/v1/double", json=[{"value": 1}, {"value": 5}])
    assert rows.json() == [{"value": 2}, {"value": 10}]
    bad_row = client.post("/v1/double", json=[{"value": 1}, {"value": "x"}])
    assert bad_row.status_code == 400
    assert bad_row.json()["error"]["message"].startswith("row 1:")


def test_everything_else_is_served_by_the_app_as_before(client: TestClient) -> None:
    assert client.get("/healthz").headers["x-anycast-replica"] == "numbers-0"
    assert client.get("/v1/half").status_code == 405
    unknown = client.post("/v1/nothing", json={})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_handler"
    assert "/v1/double" in client.get("/openapi.json").json()["paths"]
    client.post("/v1/half", json={"value": 2})
    metrics = client.get("/metrics").text
    assert 'anycast_requests_total{handler="half",status="200"}' in metrics
    assert "anycast_in_flight 0.0" in metrics
