"""Dynamic batching in the replica: gathering calls, row limits, isolation, timeouts, shedding.

The model of the test service is held closed by a gate, so calls pile up in the queue in a
known order; the tests wait for states (calls queued), never for a guessed amount of time.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from pydantic import BaseModel
from readiness import wait_ready

import anycast
from anycast.core.errors import AnycastError, InvalidInput
from anycast.replica import Batcher, CostModel, build_app

WAIT = 10.0  # seconds any awaited state may take on a loaded machine

gate = threading.Event()
model_calls: list[list[int]] = []


class Number(BaseModel):
    value: int
    slow_ms: int = 0


class Doubled(BaseModel):
    value: int


def _model(requests: list[Number]) -> list[Doubled]:
    model_calls.append([request.value for request in requests])
    gate.wait(timeout=WAIT)
    time.sleep(max(request.slow_ms for request in requests) / 1000)
    if any(request.value < 0 for request in requests):
        bad = next(request.value for request in requests if request.value < 0)
        raise InvalidInput(f"value must not be negative, got {bad}")
    if any(request.value == 13 for request in requests):
        raise ZeroDivisionError("unlucky")
    return [Doubled(value=request.value * 2) for request in requests]


class Doubler(anycast.Service):
    @anycast.handler(max_batch_size=8, max_wait_ms=1)
    def double(self, requests: list[Number]) -> list[Doubled]:
        return _model(requests)

    @anycast.handler(max_batch_size=8, max_wait_ms="auto")
    def adaptive(self, requests: list[Number]) -> list[Doubled]:
        return _model(requests)

    @anycast.handler(max_batch_size=4)
    def short(self, requests: list[Number]) -> list[Doubled]:
        return [Doubled(value=0)]  # a bug: one response whatever the number of requests

    @anycast.handler(max_batch_size=4, max_wait_ms=0)
    async def negate(self, requests: list[Number]) -> list[Doubled]:
        return [Doubled(value=-request.value) for request in requests]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    gate.set()
    model_calls.clear()
    app = build_app(Doubler, tmp_path, replica_id="doubler-0", artifact_id="dev")
    with TestClient(app) as test_client:
        wait_ready(test_client.get, timeout=WAIT)
        yield test_client
    gate.set()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def queued(client: TestClient, handler: str) -> int:
    return client.app.state.runtime.batchers[handler].queued  # type: ignore[attr-defined, no-any-return]


def hold_the_model(client: TestClient, pool: ThreadPoolExecutor, handler: str) -> Future[Any]:
    """Close the gate and send one call that enters the model and waits there."""
    gate.clear()
    calls_before = len(model_calls)
    first = pool.submit(client.post, f"/v1/{handler}", json={"value": 1})
    wait_for(lambda: len(model_calls) > calls_before, "the first call to reach the model")
    return first


def send_queued(
    client: TestClient, pool: ThreadPoolExecutor, handler: str, body: Any, **kwargs: Any
) -> Future[Any]:
    """Send one call and wait until it is queued behind the held model call."""
    before = queued(client, handler)
    future = pool.submit(client.post, f"/v1/{handler}", json=body, **kwargs)
    wait_for(lambda: queued(client, handler) > before or future.done(), "the call to queue")
    return future


def test_concurrent_calls_share_one_model_call(
    client: TestClient, pool: ThreadPoolExecutor
) -> None:
    first = hold_the_model(client, pool, "double")
    waiting = [send_queued(client, pool, "double", {"value": v}) for v in (2, 3, 4, 5, 6)]
    gate.set()

    assert first.result(timeout=WAIT).json() == {"value": 2}
    assert [f.result(timeout=WAIT).json() for f in waiting] == [
        {"value": 2 * v} for v in range(2, 7)
    ]
    assert model_calls == [[1], [2, 3, 4, 5, 6]]


def test_rows_not_calls_count_toward_the_batch_limit(
    client: TestClient, pool: ThreadPoolExecutor
) -> None:
    first = hold_the_model(client, pool, "double")
    five = send_queued(client, pool, "double", [{"value": v} for v in range(40, 45)])
    other_five = send_queued(client, pool, "double", [{"value": v} for v in range(50, 55)])
    three = send_queued(client, pool, "double", [{"value": v} for v in range(60, 63)])
    gate.set()

    first.result(timeout=WAIT)
    assert five.result(timeout=WAIT).json() == [{"value": 2 * v} for v in range(40, 45)]
    assert other_five.result(timeout=WAIT).json() == [{"value": 2 * v} for v in range(50, 55)]
    assert three.result(timeout=WAIT).json() == [{"value": 2 * v} for v in range(60, 63)]
    # 5 + 5 rows exceed the limit of 8, so the second call waits for the next model call.
    assert [len(rows) for rows in model_calls] == [1, 5, 8]
    assert max(len(rows) for rows in model_calls) <= 8


def test_one_object_gets_one_object_and_an_array_gets_an_array(client: TestClient) -> None:
    assert client.post("/v1/double", json={"value": 4}).json() == {"value": 8}
    assert client.post("/v1/double", json=[{"value": 4}]).json() == [{"value": 8}]
    rows = client.post("/v1/double", json=[{"value": v} for v in (3, 1, 2)])
    assert rows.json() == [{"value": 6}, {"value": 2}, {"value": 4}]


def test_more_rows_than_the_limit_are_refused_with_the_limit(client: TestClient) -> None:
    response = client.post("/v1/double", json=[{"value": v} for v in range(9)])
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "batch_too_large"
    assert "has 9 rows" in error["message"] and "at most 8 rows per call" in error["message"]
    assert model_calls == []


def test_empty_and_malformed_arrays_get_a_4xx_naming_the_problem(client: TestClient) -> None:
    empty = client.post("/v1/double", json=[])
    assert empty.status_code == 400
    assert empty.json()["error"]["code"] == "empty_batch"
    assert "empty JSON array" in empty.json()["error"]["message"]
    assert "array of 1 to 8" in empty.json()["error"]["message"]

    bad_row = client.post("/v1/double", json=[{"value": 1}, {"value": "many"}])
    assert bad_row.status_code == 400
    assert bad_row.json()["error"]["message"].startswith("row 1: value: Input should be")

    not_object = client.post("/v1/double", json=[{"value": 1}, 7])
    assert not_object.status_code == 400
    assert "row 1 must be a JSON object" in not_object.json()["error"]["message"]

    broken = client.post("/v1/double", content=b"[{", headers={"content-type": "application/json"})
    assert broken.status_code == 400
    assert "not valid JSON" in broken.json()["error"]["message"]
    assert model_calls == []


def test_a_bad_item_fails_only_its_own_call(client: TestClient, pool: ThreadPoolExecutor) -> None:
    first = hold_the_model(client, pool, "double")
    good = send_queued(client, pool, "double", {"value": 3})
    bad = send_queued(client, pool, "double", {"value": -1})
    crash = send_queued(client, pool, "double", {"value": 13})
    also_good = send_queued(client, pool, "double", [{"value": 5}, {"value": 6}])
    gate.set()

    first.result(timeout=WAIT)
    assert good.result(timeout=WAIT).json() == {"value": 6}
    assert also_good.result(timeout=WAIT).json() == [{"value": 10}, {"value": 12}]
    refused = bad.result(timeout=WAIT)
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "value must not be negative, got -1"
    crashed = crash.result(timeout=WAIT)
    assert crashed.status_code == 500
    assert crashed.json()["error"]["code"] == "handler_error"
    # One model call for the whole batch, then one per call to find the faulty ones.
    assert model_calls[1] == [3, -1, 13, 5, 6]
    assert model_calls[2:] == [[3], [-1], [13], [5, 6]]


def test_async_batched_handlers_are_served_too(client: TestClient) -> None:
    assert client.post("/v1/negate", json={"value": 2}).json() == {"value": -2}
    assert client.post("/v1/negate", json=[{"value": 1}, {"value": 5}]).json() == [
        {"value": -1},
        {"value": -5},
    ]


def test_a_handler_returning_too_few_responses_is_a_clear_500(client: TestClient) -> None:
    response = client.post("/v1/short", json=[{"value": 1}, {"value": 2}])
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "bad_response"
    assert "returned 1 responses for 2 requests" in response.json()["error"]["message"]


def test_a_call_whose_deadline_passes_in_the_queue_gets_503_without_running(
    client: TestClient, pool: ThreadPoolExecutor
) -> None:
    first = hold_the_model(client, pool, "double")
    deadline = {"X-Anycast-Deadline-Ms": "50"}
    late = send_queued(client, pool, "double", {"value": 7}, headers=deadline)
    time.sleep(0.2)  # well past the 50 ms the caller allows
    gate.set()

    first.result(timeout=WAIT)
    response = late.result(timeout=WAIT)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert [7] not in model_calls


def test_adaptive_handler_sheds_a_call_it_cannot_serve_in_time(client: TestClient) -> None:
    # Teach the cost model that a model call takes at least 100 ms.
    assert client.post("/v1/adaptive", json={"value": 1, "slow_ms": 100}).status_code == 200

    response = client.post(
        "/v1/adaptive", json={"value": 2}, headers={"X-Anycast-Deadline-Ms": "5"}
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "overloaded"
    assert "cannot answer within the deadline" in error["message"]
    assert [2] not in model_calls
    assert 'anycast_shed_total{handler="adaptive"} 1.0' in client.get("/metrics").text

    roomy = client.post(
        "/v1/adaptive", json={"value": 3}, headers={"X-Anycast-Deadline-Ms": "60000"}
    )
    assert roomy.json() == {"value": 6}


def test_a_malformed_deadline_header_is_a_400(client: TestClient) -> None:
    response = client.post(
        "/v1/double", json={"value": 1}, headers={"X-Anycast-Deadline-Ms": "soon"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_deadline"
    assert "whole number of milliseconds from 1 to 600000" in response.json()["error"]["message"]

    gateway_style = client.post(
        "/v1/double", json={"value": 1}, headers={"X-Anycast-Timeout-Ms": "0"}
    )
    assert gateway_style.status_code == 400
    assert gateway_style.json()["error"]["message"].startswith("X-Anycast-Timeout-Ms must be")


def test_metrics_show_rows_per_model_call_and_queue_wait(
    client: TestClient, pool: ThreadPoolExecutor
) -> None:
    first = hold_the_model(client, pool, "double")
    rows = send_queued(client, pool, "double", [{"value": v} for v in range(6)])
    gate.set()
    first.result(timeout=WAIT)
    rows.result(timeout=WAIT)

    text = client.get("/metrics").text
    assert 'anycast_batch_rows_count{handler="double"} 2.0' in text
    assert 'anycast_batch_rows_sum{handler="double"} 7.0' in text
    assert 'anycast_queue_seconds_count{handler="double"} 2.0' in text


def test_openapi_documents_batched_bodies_and_handler_options(client: TestClient) -> None:
    post = client.get("/openapi.json").json()["paths"]["/v1/double"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    single, rows = schema["oneOf"]
    assert single == {"$ref": "#/components/schemas/Number"}
    assert rows["type"] == "array" and rows["maxItems"] == 8 and rows["minItems"] == 1
    assert post["x-anycast"] == {
        "idempotent": True,
        "deterministic": False,
        "max_batch_size": 8,
        "max_wait_ms": 1.0,
    }


# The batcher on its own, with an async model.


def run_scenario(scenario: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), WAIT))


def test_a_caller_that_times_out_is_skipped_and_later_callers_are_served() -> None:
    async def scenario() -> None:
        opened = asyncio.Event()
        seen: list[list[int]] = []

        async def run(rows: list[int]) -> list[int]:
            seen.append(rows)
            await opened.wait()
            return [row * 2 for row in rows]

        batcher = Batcher("double", run, max_batch_size=4, max_wait_ms=0)
        first = asyncio.ensure_future(batcher.submit([1]))
        while not seen:
            await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit([2]), timeout=0.05)
        cancelled = asyncio.ensure_future(batcher.submit([3]))
        await asyncio.sleep(0)
        cancelled.cancel()
        later = asyncio.ensure_future(batcher.submit([4, 5]))
        await asyncio.sleep(0)
        opened.set()

        assert await first == [2]
        assert await later == [8, 10]
        assert seen == [[1], [4, 5]]  # the rows of the callers who left never ran
        assert await batcher.submit([6]) == [12]
        await batcher.close()

    run_scenario(scenario)


def test_closing_answers_waiting_calls_with_503() -> None:
    async def scenario() -> None:
        async def run(rows: list[int]) -> list[int]:
            await asyncio.Event().wait()  # never finishes
            return rows

        batcher = Batcher("stuck", run, max_batch_size=2, max_wait_ms=0)
        running = asyncio.ensure_future(batcher.submit([1]))
        waiting = asyncio.ensure_future(batcher.submit([2, 3]))
        await asyncio.sleep(0.01)
        await batcher.close()
        for call in (running, waiting):
            with pytest.raises(AnycastError) as info:
                await call
            assert info.value.status == 503

    run_scenario(scenario)


def test_cost_model_separates_fixed_and_per_row_cost() -> None:
    cost = CostModel()
    assert cost.fit() == (0.0, 0.0) and not cost.known
    for rows in (1, 4, 8, 16, 2):
        cost.observe_batch(rows, 0.010 + 0.001 * rows)
    fixed, per_row = cost.fit()
    assert fixed == pytest.approx(0.010, rel=1e-6)
    assert per_row == pytest.approx(0.001, rel=1e-6)
    assert cost.estimate(10) == pytest.approx(0.020, rel=1e-6)

    same_size = CostModel()
    for _ in range(3):
        same_size.observe_batch(1, 0.004)
    assert same_size.fit() == pytest.approx((0.004, 0.0))


def test_cost_model_measures_the_rate_of_rows_that_join_while_waiting() -> None:
    cost = CostModel()
    assert cost.arrival_rate is None
    cost.observe_wait(0.010, 5)
    assert cost.arrival_rate == pytest.approx(500.0)
    for _ in range(40):  # waits that nobody joins soon outweigh the old one
        cost.observe_wait(0.002, 0)
    assert cost.arrival_rate is not None and cost.arrival_rate < 50.0


# The lean data path.


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_image_stack_decodes_every_image_into_one_array() -> None:
    grey = np.full((28, 28), 200, dtype=np.uint8)
    colour = np.zeros((56, 40, 3), dtype=np.uint8)
    images = [anycast.Image.from_bytes(png(grey)), anycast.Image.from_bytes(png(colour))]
    pixels = anycast.Image.stack(images, mode="L", size=(28, 28))
    assert pixels.shape == (2, 28, 28) and pixels.dtype == np.uint8
    assert pixels.flags.writeable and pixels.flags.c_contiguous
    assert (pixels[0] == 200).all() and (pixels[1] == 0).all()
    np.testing.assert_array_equal(pixels[1], images[1].to_array(mode="L", size=(28, 28)))

    with pytest.raises(ValueError, match="pass size="):
        anycast.Image.stack(images, mode="L")


class Grad(BaseModel):
    value: float


class GradState(BaseModel):
    inference_mode: bool


class TorchUser(anycast.Service):
    @anycast.handler
    def mode(self, request: Grad) -> GradState:
        import torch

        return GradState(inference_mode=torch.is_inference_mode_enabled())


def test_sync_handlers_run_under_torch_inference_mode(tmp_path: Path) -> None:
    import torch  # noqa: F401  (the runtime uses inference mode once torch is loaded)

    with TestClient(build_app(TorchUser, tmp_path, replica_id="t-0", artifact_id="dev")) as c:
        deadline = time.monotonic() + WAIT
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert c.post("/v1/mode", json={"value": 1}).json() == {"inference_mode": True}
