"""The replica app in-process: readiness, routing, errors, metrics and the OpenAPI schema."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import readiness
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from pydantic import BaseModel

import anycast
from anycast.core.errors import ConfigError, InvalidInput
from anycast.replica import build_app

release_setup = threading.Event()


class Upload(BaseModel):
    image: anycast.Image


class Size(BaseModel):
    width: int
    height: int


class Number(BaseModel):
    value: int


class Sizer(anycast.Service):
    def setup(self) -> None:
        release_setup.wait(timeout=10)

    @anycast.handler
    def size(self, request: Upload) -> Size:
        return Size(width=request.image.width, height=request.image.height)

    @anycast.handler(idempotent=False)
    async def half(self, request: Number) -> Number:
        if request.value % 2:
            raise InvalidInput(f"value must be even, got {request.value}")
        return Number(value=request.value // 2)

    @anycast.handler
    def crash(self, request: Number) -> Number:
        raise ZeroDivisionError("oops")


class Broken(anycast.Service):
    def setup(self) -> None:
        raise RuntimeError("weights are missing")

    @anycast.handler
    def half(self, request: Number) -> Number:
        return request


def png(width: int = 3, height: int = 2) -> bytes:
    buf = io.BytesIO()
    PILImage.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def wait_ready(client: TestClient) -> None:
    readiness.wait_ready(client.get, timeout=5)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    release_setup.clear()
    app = build_app(Sizer, tmp_path, replica_id="sizer-test-0", artifact_id="a" * 64)
    with TestClient(app) as test_client:
        yield test_client
    release_setup.set()


def test_not_ready_while_setup_runs_then_ready(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    loading = client.get("/readyz")
    assert loading.status_code == 503
    assert loading.json()["status"] == "loading"
    assert "setup() is still running" in loading.json()["error"]["message"]

    early = client.post("/v1/half", json={"value": 4})
    assert early.status_code == 503
    assert early.headers["retry-after"] == "1"
    assert early.json()["error"]["code"] == "loading"

    release_setup.set()
    wait_ready(client)
    assert client.post("/v1/half", json={"value": 4}).json() == {"value": 2}


def test_responses_name_the_replica_and_artifact(client: TestClient) -> None:
    release_setup.set()
    wait_ready(client)
    response = client.post("/v1/size", json={"image": base64.b64encode(png()).decode()})
    assert response.json() == {"width": 3, "height": 2}
    assert response.headers["x-anycast-replica"] == "sizer-test-0"
    assert response.headers["x-anycast-artifact"] == "a" * 64
    assert client.get("/healthz").headers["x-anycast-replica"] == "sizer-test-0"


def test_multipart_upload_only_for_handlers_with_an_image(client: TestClient) -> None:
    release_setup.set()
    wait_ready(client)
    upload = client.post("/v1/size", files={"image": ("d.png", png(5, 7), "image/png")})
    assert upload.json() == {"width": 5, "height": 7}

    refused = client.post("/v1/half", files={"image": ("d.png", png(), "image/png")})
    assert refused.status_code == 415
    assert "application/json only" in refused.json()["error"]["message"]


def test_handler_errors_are_json(client: TestClient) -> None:
    release_setup.set()
    wait_ready(client)
    odd = client.post("/v1/half", json={"value": 3})
    assert odd.status_code == 400
    assert odd.json()["error"]["message"] == "value must be even, got 3"

    crash = client.post("/v1/crash", json={"value": 1})
    assert crash.status_code == 500
    assert crash.json()["error"] == {
        "code": "handler_error",
        "message": "handler crash failed (ZeroDivisionError); see the replica log",
    }

    wrong_type = client.post("/v1/half", json={"value": "many"})
    assert wrong_type.status_code == 400
    assert wrong_type.json()["error"]["message"].startswith(
        "value: Input should be a valid integer"
    )


def test_unknown_handler_lists_the_real_ones(client: TestClient) -> None:
    response = client.post("/v1/nope", json={})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "unknown_handler",
        "message": "no handler 'nope' in Sizer; handlers: crash, half, size",
    }


def test_metrics_count_calls_by_handler_and_status(client: TestClient) -> None:
    release_setup.set()
    wait_ready(client)
    client.post("/v1/half", json={"value": 2})
    client.post("/v1/half", json={"value": 1})
    text = client.get("/metrics").text
    assert 'anycast_requests_total{handler="half",status="200"} 1.0' in text
    assert 'anycast_requests_total{handler="half",status="400"} 1.0' in text
    assert 'anycast_request_seconds_count{handler="half"} 2.0' in text
    assert "anycast_in_flight 0.0" in text
    assert "anycast_ready 1.0" in text


def test_openapi_documents_json_and_multipart_bodies(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/size"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/Upload"}
    assert "image" in body["multipart/form-data"]["schema"]["properties"]
    upload = schema["components"]["schemas"]["Upload"]
    assert upload["properties"]["image"]["contentEncoding"] == "base64"
    assert "Size" in schema["components"]["schemas"]
    assert (
        "multipart/form-data" not in schema["paths"]["/v1/half"]["post"]["requestBody"]["content"]
    )
    assert "/healthz" not in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_failed_setup_is_reported_by_readyz(tmp_path: Path) -> None:
    reasons: list[str] = []
    app = build_app(
        Broken, tmp_path, replica_id="broken-0", artifact_id="dev", on_setup_failure=reasons.append
    )
    with TestClient(app) as client:
        readiness.wait_failed(reasons, timeout=5)
        ready = client.get("/readyz")
        call = client.post("/v1/half", json={"value": 2})
    assert reasons == ["RuntimeError: weights are missing"]
    assert ready.status_code == 503 and ready.json()["status"] == "failed"
    assert "weights are missing" in ready.json()["error"]["message"]
    assert call.status_code == 503 and call.json()["error"]["code"] == "setup_failed"


def test_build_app_refuses_unsafe_identity_headers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="replica id"):
        build_app(Sizer, tmp_path, replica_id="bad\r\nid", artifact_id="dev")


def test_draining_replica_leaves_rotation_but_serves_calls_that_still_reach_it(
    client: TestClient,
) -> None:
    release_setup.set()
    wait_ready(client)
    client.app.state.runtime.begin_drain(10.0)  # type: ignore[attr-defined]

    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "1"
    assert ready.json()["status"] == "draining"
    assert ready.json()["error"]["code"] == "draining"

    late = client.post("/v1/half", json={"value": 4})  # from a caller that has not noticed yet
    assert late.status_code == 200
    assert client.app.state.runtime.idle_seconds() < 5  # type: ignore[attr-defined]
    assert client.get("/healthz").status_code == 200
    assert "anycast_draining 1.0" in client.get("/metrics").text


class Meeting(anycast.Service):
    """Calls that each wait for another call to arrive: they need two handler threads."""

    def setup(self) -> None:
        self.barrier = threading.Barrier(2, timeout=20)

    @anycast.handler
    def meet(self, request: Number) -> Number:
        self.barrier.wait()
        return request


def test_sync_handler_calls_run_concurrently_up_to_the_handler_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANYCAST_HANDLER_THREADS", "2")
    app = build_app(Meeting, tmp_path, replica_id="meeting-0", artifact_id="dev")
    with TestClient(app) as client:
        wait_ready(client)
        with ThreadPoolExecutor(max_workers=2) as pool:
            calls = [pool.submit(client.post, "/v1/meet", json={"value": v}) for v in (1, 2)]
            answers = [call.result(timeout=30) for call in calls]
    assert [a.status_code for a in answers] == [200, 200]
    assert sorted(a.json()["value"] for a in answers) == [1, 2]


@pytest.mark.parametrize("raw", ["0", "65", "two", "-1", ""])
def test_handler_threads_outside_1_to_64_are_refused_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("ANYCAST_HANDLER_THREADS", raw)
    with pytest.raises(ConfigError, match="ANYCAST_HANDLER_THREADS must be a whole number from 1"):
        build_app(Meeting, tmp_path, replica_id="meeting-0", artifact_id="dev")
