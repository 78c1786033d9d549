"""`anycast build --format onnx` of the digit example, served by a real replica process."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from cluster import Replica

from anycast.core.http import free_port
from anycast.datasets import mnist, to_png
from anycast.registry import LocalStorage, Registry, verify_dir
from anycast.training import DigitCNN, load_model, preprocess, save_weights

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mnist" / "service.py"
DIGITS = 8


def _anycast(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "anycast.cli.main", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_weights(DigitCNN(), tmp_path_factory.mktemp("weights") / "weights.safetensors")


@pytest.fixture(scope="module")
def onnx_artifact(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Path:
    """The example built with --format onnx, pushed and pulled as a region agent does."""
    work = tmp_path_factory.mktemp("build")
    built = _anycast(
        "build", f"{EXAMPLE}:DigitClassifier", "--name", "digits", "--version", "1",
        "--file", f"weights.safetensors={weights}", "--format", "onnx", cwd=work,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    artifact_id, tar = built.stdout.split()

    registry = Registry(LocalStorage(work / "registry"))
    assert registry.push(work / tar)["id"] == artifact_id
    return registry.pull(artifact_id, work / "region" / "artifacts")


@pytest.fixture(scope="module")
def replica(onnx_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    port = free_port()
    args = ["anycast.replica", "--artifact", str(onnx_artifact), "--port", str(port)]
    log = tmp_path_factory.mktemp("replica") / "replica.log"
    running = Replica([*args, "--replica-id", "digits-0"], port, log)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_onnx_artifact_verifies_and_ships_the_model_next_to_the_weights(
    onnx_artifact: Path,
) -> None:
    manifest = verify_dir(onnx_artifact, onnx_artifact.name)
    assert manifest["backend"] == "onnx"
    assert {"model.onnx", "weights.safetensors", "service.py"} <= set(manifest["files"])


def test_the_replica_serves_real_digits_with_torch_probabilities(
    replica: Replica, onnx_artifact: Path, weights: Path
) -> None:
    images = mnist().test_images[:DIGITS]  # (8, 28, 28) uint8
    with torch.inference_mode():
        expected = load_model(weights)(preprocess(images)).softmax(dim=1).numpy()  # (8, 10)

    for image, want in zip(images, expected, strict=True):
        png = base64.b64encode(to_png(image)).decode()
        response = httpx.post(f"{replica.url}/v1/predict", json={"image": png}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert np.abs(np.array(body["probabilities"]) - want).max() < 1e-4
        assert body["digit"] == int(want.argmax())
        assert response.headers["x-anycast-artifact"] == onnx_artifact.name

    assert "loaded ONNX model" in replica.log  # the replica ran ONNX Runtime, not torch
    assert "1 intra-op thread(s)" in replica.log


def test_bad_input_to_the_onnx_replica_is_still_a_clear_4xx(replica: Replica) -> None:
    response = httpx.post(f"{replica.url}/v1/predict", json={"image": "%%%"}, timeout=30)
    assert response.status_code == 400
    assert "not valid base64" in response.json()["error"]["message"]


def test_an_array_of_digits_runs_as_one_onnx_batch_in_order(
    replica: Replica, weights: Path
) -> None:
    images = mnist().test_images[DIGITS : DIGITS + 5]  # (5, 28, 28) uint8
    with torch.inference_mode():
        expected = load_model(weights)(preprocess(images)).softmax(dim=1).numpy()  # (5, 10)
    rows = [{"image": base64.b64encode(to_png(image)).decode()} for image in images]

    response = httpx.post(f"{replica.url}/v1/predict", json=rows, timeout=30)

    assert response.status_code == 200, response.text
    got = np.array([answer["probabilities"] for answer in response.json()])
    assert got.shape == (5, 10)
    assert np.abs(got - expected).max() < 1e-4
