"""The ONNX Runtime backend: export, OnnxModel, and how a service picks its backend."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel

import anycast
from anycast.core.errors import ConfigError, InvalidInput
from anycast.datasets import Mnist, mnist
from anycast.registry import artifact
from anycast.sdk import onnx
from anycast.sdk.onnx import OnnxModel, backend_of, export_onnx, exported_model, onnx_threads
from anycast.training import DigitCNN, preprocess, train


@pytest.fixture(scope="module")
def data() -> Mnist:
    return mnist()


@pytest.fixture(scope="module")
def trained(data: Mnist) -> DigitCNN:
    return train(data, epochs=1, max_train=2000, batch_size=32, augment=False).model


@pytest.fixture(scope="module")
def exported(trained: DigitCNN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(trained, torch.zeros(1, 1, 28, 28), path)


def test_onnx_probabilities_match_torch_on_every_held_out_digit(
    trained: DigitCNN, exported: Path, data: Mnist
) -> None:
    batch = preprocess(data.test_images)  # (2000, 1, 28, 28)
    with torch.inference_mode():
        expected = trained(batch).softmax(dim=1)
        got = OnnxModel(exported)(batch).softmax(dim=1)

    assert got.shape == (len(data.test_labels), 10)
    assert float((got - expected).abs().max()) < 1e-4
    assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))
    accuracy = float((got.argmax(dim=1) == torch.as_tensor(data.test_labels)).float().mean())
    assert accuracy > 0.8  # a real, if briefly trained, classifier


def test_numpy_in_numpy_out_and_torch_in_torch_out(exported: Path) -> None:
    model = OnnxModel(exported)
    pixels = np.zeros((3, 1, 28, 28), dtype=np.float64)  # cast to the model's float32

    as_numpy = model(pixels)
    as_torch = model(torch.from_numpy(pixels))

    assert isinstance(as_numpy, np.ndarray) and as_numpy.shape == (3, 10)
    assert isinstance(as_torch, torch.Tensor) and as_torch.shape == (3, 10)
    np.testing.assert_array_equal(as_numpy, as_torch.numpy())
    assert model.eval() is model


def test_a_wrong_input_shape_is_a_clear_invalid_input(exported: Path) -> None:
    with pytest.raises(InvalidInput, match=r"cannot run on an input of shape \[28, 28\]"):
        OnnxModel(exported)(np.zeros((28, 28), dtype=np.float32))


def test_sessions_use_one_thread_unless_the_env_variable_says_otherwise(
    exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANYCAST_TORCH_THREADS", raising=False)
    assert OnnxModel(exported).threads == 1
    monkeypatch.setenv("ANYCAST_TORCH_THREADS", "2")
    assert OnnxModel(exported).threads == 2

    for bad in ("0", "two", "-1"):
        with pytest.raises(ConfigError, match="ANYCAST_TORCH_THREADS must be a whole number"):
            onnx_threads({"ANYCAST_TORCH_THREADS": bad})


def test_a_file_that_is_not_onnx_is_refused_with_its_name(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"model\.onnx is not a model ONNX Runtime can load"):
        OnnxModel(bad)


def test_export_is_deterministic(trained: DigitCNN, exported: Path, tmp_path: Path) -> None:
    again = export_onnx(trained, torch.zeros(4, 1, 28, 28), tmp_path / "again.onnx")
    assert again.read_bytes() == exported.read_bytes()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_model_onnx_cannot_reproduce_is_refused(tmp_path: Path) -> None:
    class Unstable(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand(1).item()  # traced as a constant: ONNX cannot match it

    with pytest.raises(InvalidInput, match="does not reproduce the torch model"):
        export_onnx(Unstable(), torch.zeros(2, 3), tmp_path / "model.onnx")


class Empty(BaseModel):
    pass


class Plain(anycast.Service):
    @anycast.handler
    def predict(self, request: Empty) -> Empty:
        return request


class Exportable(Plain):
    def setup(self) -> None:
        self.model = torch.nn.Linear(3, 2)

    def export_model(self) -> tuple[torch.nn.Module, torch.Tensor]:
        return self.model, torch.zeros(1, 3)


def test_backend_follows_the_artifact_manifest(tmp_path: Path) -> None:
    service = Plain(files_dir=tmp_path)
    assert backend_of(service) == "torch"  # not an artifact, no model.onnx

    (tmp_path / "manifest.json").write_text(json.dumps({"backend": "onnx"}))
    assert backend_of(Plain(files_dir=tmp_path)) == "onnx"
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "built-before-backends"}))
    assert backend_of(Plain(files_dir=tmp_path)) == "torch"
    (tmp_path / "manifest.json").write_text(json.dumps({"backend": "tensorflow"}))
    with pytest.raises(ConfigError, match="one of torch, onnx, got 'tensorflow'"):
        backend_of(Plain(files_dir=tmp_path))


def test_backend_outside_an_artifact_is_onnx_when_a_model_onnx_is_given(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    service = Plain(files_dir=tmp_path / "elsewhere", files={"model.onnx": tmp_path / "model.onnx"})
    assert backend_of(service) == "onnx"

    service.backend = "torch"  # type: ignore[attr-defined]  # what anycast build sets
    assert backend_of(service) == "torch"


def test_export_hook_missing_or_malformed_says_how_to_write_it() -> None:
    with pytest.raises(InvalidInput, match="Plain has no exportable model") as missing:
        exported_model(Plain())
    assert "export_model(self) -> tuple[torch.nn.Module, torch.Tensor]" in missing.value.message

    class Wrong(Exportable):
        def export_model(self) -> tuple[torch.nn.Module, torch.Tensor]:
            return self.model  # type: ignore[return-value]

    wrong = Wrong()
    wrong.setup()
    with pytest.raises(InvalidInput, match=r"Wrong.export_model\(\) returned Linear"):
        exported_model(wrong)

    good = Exportable()
    good.setup()
    model, example = exported_model(good)
    assert model is good.model and example.shape == (1, 3)


def test_the_sdk_and_the_artifact_format_agree_on_names() -> None:
    assert onnx.BACKENDS == artifact.BACKENDS
    assert onnx.ONNX_FILE == artifact.ONNX_FILE
    assert onnx.MANIFEST_FILE == artifact.MANIFEST
    assert anycast.OnnxModel is OnnxModel and anycast.backend_of is backend_of


def test_without_the_onnx_extra_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'anycast\[onnx\]'"):
        OnnxModel(tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match="not installed"):
        export_onnx(torch.nn.Linear(3, 2), torch.zeros(1, 3), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
