"""Real replica processes on 127.0.0.1: the MNIST example from source and from artifacts."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import signal
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cluster import READY_TIMEOUT, Replica
from PIL import Image as PILImage

from anycast.core.http import free_port
from anycast.registry.artifact import FORMAT, MANIFEST, manifest_id
from anycast.training import DigitCNN, save_weights

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mnist" / "service.py"


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def digit_png() -> bytes:
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[4:24, 13:15] = 255  # a "1", white on black as in MNIST
    return png_bytes(pixels)


def huge_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid PNG of 100 million black pixels that compresses to about 100 KB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(b"\0" * (width + 1)) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_weights(DigitCNN(), tmp_path_factory.mktemp("weights") / "weights.safetensors")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Iterator[Replica]:
    """`anycast serve` of the example, with weights passed by --file."""
    port = free_port()
    args = ["anycast", "serve", f"{EXAMPLE}:DigitClassifier", "--port", str(port)]
    args += ["--file", f"weights.safetensors={weights}", "--replica-id", "dev-0"]
    replica = Replica(args, port, tmp_path_factory.mktemp("serve") / "replica.log")
    try:
        replica.wait_ready()
        yield replica
    finally:
        code = replica.stop()
    assert code in (0, -signal.SIGTERM), replica.log


def check_prediction(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"digit", "probability", "probabilities"}
    assert 0 <= body["digit"] <= 9
    assert len(body["probabilities"]) == 10
    assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert body["probability"] == max(body["probabilities"])
    return body


def test_predict_with_base64_json_and_with_multipart(served: Replica) -> None:
    png = digit_png()
    as_json = httpx.post(f"{served.url}/v1/predict", json={"image": b64(png)})
    as_upload = httpx.post(
        f"{served.url}/v1/predict", files={"image": ("digit.png", png, "image/png")}
    )
    assert check_prediction(as_json) == check_prediction(as_upload)
    assert as_json.headers["x-anycast-replica"] == "dev-0"
    assert as_json.headers["x-anycast-artifact"] == "dev"


def test_larger_colour_images_are_resized(served: Replica) -> None:
    rgb = np.zeros((280, 200, 3), dtype=np.uint8)
    check_prediction(httpx.post(f"{served.url}/v1/predict", json={"image": b64(png_bytes(rgb))}))


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("empty body", {"content": b""}, 400, "request body is empty"),
    ("empty object", {"json": {}}, 400, "image: Field required"),
    ("array", {"json": []}, 400, "must be a JSON object"),
    ("null", {"content": b"null"}, 400, "must be a JSON object"),
    ("plain text", {"content": b"hello"}, 400, "not valid JSON"),
    ("not base64", {"json": {"image": "%%%"}}, 400, "not valid base64"),
    ("text as image", {"json": {"image": b64(b"hello there")}}, 400, "PNG or JPEG"),
    ("truncated png", {"json": {"image": b64(digit_png()[:60])}}, 400, "truncated or corrupt"),
    (
        "wrong content type",
        {"content": b"x", "headers": {"content-type": "text/csv"}},
        415,
        "text/csv",
    ),
    ("upload without image", {"files": {"photo": ("a.png", b"x")}}, 400, "'image' file field"),
    ("truncated upload", {"files": {"image": ("a.png", digit_png()[:60])}}, 400, "truncated"),
    ("body over the limit", {"content": b"{" * (13 << 20)}, 413, "at most"),
]


@pytest.mark.parametrize(
    ("kwargs", "status", "fragment"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_gets_a_clear_4xx_and_the_replica_keeps_serving(
    served: Replica, kwargs: dict[str, Any], status: int, fragment: str
) -> None:
    response = httpx.post(f"{served.url}/v1/predict", timeout=10, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["code"]

    check_prediction(httpx.post(f"{served.url}/v1/predict", json={"image": b64(digit_png())}))


def test_huge_image_is_refused_quickly_without_decoding(served: Replica) -> None:
    bomb = huge_png()
    started = time.perf_counter()
    response = httpx.post(f"{served.url}/v1/predict", files={"image": ("big.png", bomb)})
    assert time.perf_counter() - started < 2.0  # decoding would also allocate 100 MB
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "image_too_large"
    assert "10000x10000" in response.json()["error"]["message"]
    assert httpx.get(f"{served.url}/healthz").status_code == 200


def test_unknown_handler_and_metrics(served: Replica) -> None:
    missing = httpx.post(f"{served.url}/v1/classify", json={})
    assert missing.status_code == 404
    assert "handlers: predict" in missing.json()["error"]["message"]

    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'anycast_requests_total{handler="predict",status="200"}' in metrics
    assert "anycast_ready 1.0" in metrics


def test_openapi_shows_the_typed_schema(served: Replica) -> None:
    schema = httpx.get(f"{served.url}/openapi.json").json()
    post = schema["paths"]["/v1/predict"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    response_schema = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert response_schema == {"$ref": "#/components/schemas/DigitPrediction"}
    assert "image" in schema["components"]["schemas"]["DigitRequest"]["properties"]


# Artifacts, as a region agent unpacks them and runs `python -m anycast.replica`.


def make_artifact(root: Path, files: dict[str, Path], service: str) -> Path:
    """An unpacked artifact folder named by its id, built by hand."""
    staging = root / "staging"
    staging.mkdir(parents=True)
    checksums = {}
    for name, source in files.items():
        shutil.copy(source, staging / name)
        checksums[name] = hashlib.sha256((staging / name).read_bytes()).hexdigest()
    manifest = {
        "format": FORMAT,
        "name": "digits",
        "version": "1",
        "service": service,
        "files": checksums,
        "framework": {"python": "3.11", "torch": "2.13.0", "anycast": "0.1.0"},
    }
    (staging / MANIFEST).write_text(json.dumps(manifest))
    return staging.rename(root / manifest_id(manifest))


def run_artifact(artifact: Path, log_path: Path, *extra: str) -> Replica:
    port = free_port()
    args = ["anycast.replica", "--artifact", str(artifact), "--port", str(port)]
    return Replica([*args, "--replica-id", "digits-us-east-0", *extra], port, log_path)


def example_files(weights: Path) -> dict[str, Path]:
    return {"service.py": EXAMPLE, "weights.safetensors": weights}


def test_verified_artifact_serves_with_its_id(tmp_path: Path, weights: Path) -> None:
    artifact = make_artifact(tmp_path, example_files(weights), "service.py:DigitClassifier")
    replica = run_artifact(artifact, tmp_path / "replica.log")
    try:
        replica.wait_ready()
        response = httpx.post(f"{replica.url}/v1/predict", json={"image": b64(digit_png())})
        check_prediction(response)
        assert response.headers["x-anycast-artifact"] == artifact.name
        assert response.headers["x-anycast-replica"] == "digits-us-east-0"
    finally:
        replica.stop()


def test_tampered_artifact_exits_3_and_is_never_ready(tmp_path: Path, weights: Path) -> None:
    artifact = make_artifact(tmp_path, example_files(weights), "service.py:DigitClassifier")
    with (artifact / "weights.safetensors").open("r+b") as fh:
        fh.seek(200)
        fh.write(b"\xff\xff\xff\xff")
    replica = run_artifact(artifact, tmp_path / "replica.log")
    assert replica.wait_exit() == 3
    assert "weights.safetensors fails its checksum" in replica.log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{replica.url}/readyz", timeout=1)


def test_artifact_id_mismatch_exits_3(tmp_path: Path, weights: Path) -> None:
    artifact = make_artifact(tmp_path, example_files(weights), "service.py:DigitClassifier")
    replica = run_artifact(artifact, tmp_path / "replica.log", "--artifact-id", "0" * 64)
    assert replica.wait_exit() == 3
    assert "not the artifact id" in replica.log


def test_service_outside_the_manifest_exits_3(tmp_path: Path, weights: Path) -> None:
    artifact = make_artifact(tmp_path, {"weights.safetensors": weights}, "extra.py:Evil")
    (artifact / "extra.py").write_text("raise SystemExit('this code must never run')\n")
    replica = run_artifact(artifact, tmp_path / "replica.log")
    assert replica.wait_exit() == 3
    assert "not one of its checksummed files" in replica.log
    assert "must never run" not in replica.log


FAILING_SERVICE = """
import anycast
from pydantic import BaseModel


class Empty(BaseModel):
    pass


class NeedsWeights(anycast.Service):
    def setup(self) -> None:
        raise RuntimeError("no weights for this model")

    @anycast.handler
    def predict(self, request: Empty) -> Empty:
        return request
"""


def test_service_whose_setup_raises_exits_4_with_the_reason(tmp_path: Path) -> None:
    source = tmp_path / "failing.py"
    source.write_text(FAILING_SERVICE)
    artifact = make_artifact(tmp_path / "a", {"service.py": source}, "service.py:NeedsWeights")
    replica = run_artifact(artifact, tmp_path / "replica.log")
    assert replica.wait_exit() == 4
    last_line = replica.log.strip().splitlines()[-1]
    assert "setup() failed" in last_line and "RuntimeError: no weights for this model" in last_line


# Batching through a real replica.


def test_predict_takes_an_array_of_images_and_answers_in_order(served: Replica) -> None:
    one, blank = digit_png(), png_bytes(np.zeros((28, 28), dtype=np.uint8))
    rows = [{"image": b64(one)}, {"image": b64(blank)}, {"image": b64(one)}]
    response = httpx.post(f"{served.url}/v1/predict", json=rows, timeout=30)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert isinstance(answers, list) and len(answers) == 3
    single = check_prediction(httpx.post(f"{served.url}/v1/predict", json=rows[0], timeout=30))
    assert answers[0]["digit"] == answers[2]["digit"] == single["digit"]
    assert answers[0]["probability"] == pytest.approx(single["probability"], abs=1e-5)

    too_many = httpx.post(f"{served.url}/v1/predict", json=[rows[0]] * 65, timeout=30)
    assert too_many.status_code == 413
    assert "at most 64 rows per call" in too_many.json()["error"]["message"]


GATED_SERVICE = """
import time
from pathlib import Path

import anycast
from pydantic import BaseModel


class Job(BaseModel):
    name: str
    gate: str = ""  # the model waits until this file exists (at most 60 s)


class Done(BaseModel):
    name: str
    batch: list[str]


class Gated(anycast.Service):
    @anycast.handler(max_batch_size=8, max_wait_ms=1)
    def run(self, jobs: list[Job]) -> list[Done]:
        for job in jobs:
            deadline = time.monotonic() + 60
            while job.gate and not Path(job.gate).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        names = [job.name for job in jobs]
        return [Done(name=job.name, batch=names) for job in jobs]
"""

GATED_TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[Replica]:
    source = tmp_path / "gated.py"
    source.write_text(GATED_SERVICE)
    port = free_port()
    args = ["anycast", "serve", f"{source}:Gated", "--port", str(port), "--replica-id", "gated-0"]
    replica = Replica(args, port, tmp_path / "replica.log")
    try:
        replica.wait_ready()
        yield replica
    finally:
        if replica.process.poll() is None:
            (tmp_path / "open").touch()
            replica.stop()


def wait_for_metric(replica: Replica, line: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while line not in httpx.get(f"{replica.url}/metrics", timeout=5).text:
        assert time.monotonic() < deadline, f"metric {line!r} never appeared:\n{replica.log}"
        time.sleep(0.05)


def test_a_caller_that_hangs_up_is_dropped_from_the_batch(gated: Replica, tmp_path: Path) -> None:
    gate = tmp_path / "open"
    url = f"{gated.url}/v1/run"
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(httpx.post, url, json={"name": "a", "gate": str(gate)}, timeout=60)
        wait_for_metric(gated, "anycast_in_flight 1.0")

        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={"name": "gone"}, timeout=httpx.Timeout(10.0, read=0.5))
        wait_for_metric(gated, 'anycast_requests_total{handler="run",status="499"} 1.0')

        later = pool.submit(httpx.post, url, json={"name": "c"}, timeout=60)
        wait_for_metric(gated, "anycast_in_flight 2.0")
        gate.touch()
        assert held.result(timeout=60).json() == {"name": "a", "batch": ["a"]}
        assert later.result(timeout=60).json() == {"name": "c", "batch": ["c"]}


def test_sigterm_drains_the_calls_in_flight_then_exits(gated: Replica, tmp_path: Path) -> None:
    gate = tmp_path / "open"
    url = f"{gated.url}/v1/run"
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(httpx.post, url, json={"name": "held", "gate": str(gate)}, timeout=60)
        wait_for_metric(gated, "anycast_in_flight 1.0")
        gated.process.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + READY_TIMEOUT
        while (ready := httpx.get(f"{gated.url}/readyz", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "readyz never turned 503"
            time.sleep(0.02)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        # A caller that has not seen the drain yet is still served, not refused.
        late = pool.submit(httpx.post, url, json={"name": "late", "gate": str(gate)}, timeout=60)
        wait_for_metric(gated, "anycast_in_flight 2.0")
        assert gated.process.poll() is None, "the replica left before its calls finished"

        gate.touch()
        response = held.result(timeout=60)
        late_response = late.result(timeout=60)
    assert response.status_code == 200
    assert response.json()["name"] == "held"
    assert late_response.status_code == 200 and late_response.json()["name"] == "late"
    assert gated.wait_exit() in (0, -signal.SIGTERM)
    assert "drained" in gated.log
