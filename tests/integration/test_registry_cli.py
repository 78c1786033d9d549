"""`anycast build` and `anycast push` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from anycast.core.http import free_port
from anycast.registry import LocalStorage, Registry


def _anycast(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "anycast.cli.main", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_build_then_push_into_the_home_registry(tmp_path: Path) -> None:
    (tmp_path / "svc").mkdir()
    (tmp_path / "svc" / "service.py").write_text(NO_EXPORT_SERVICE)
    (tmp_path / "weights.bin").write_bytes(b"w" * 100)
    offline = f"http://127.0.0.1:{free_port()}"

    built = _anycast(
        "build", "svc/service.py:Echo", "--name", "echo", "--version", "1",
        "--file", "weights.bin=weights.bin", cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    artifact_id, tar = built.stdout.split()
    assert tar == "dist/echo-1.tar"

    pushed = _anycast("push", tar, "--home", "home", "--control", offline, cwd=tmp_path)
    assert pushed.returncode == 1, pushed.stderr  # stored, but not registered: not deployable
    assert "not reachable" in pushed.stderr
    assert "run this push again" in " ".join(pushed.stderr.split())
    registry = Registry(LocalStorage(tmp_path / "home" / "registry"))
    assert registry.resolve("echo:1") == artifact_id

    (tmp_path / "weights.bin").write_bytes(b"x" * 100)
    rebuilt = _anycast(
        "build", "svc/service.py:Echo", "--name", "echo", "--version", "1",
        "--file", "weights.bin=weights.bin", "--out", "dist2", cwd=tmp_path,
    )  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr
    refused = _anycast("push", "dist2/echo-1.tar", "--home", "home", "--control", offline,
                       cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 1
    assert "immutable" in refused.stderr


def test_build_with_a_bad_reference_says_what_is_expected(tmp_path: Path) -> None:
    failed = _anycast("build", "service.py", "--name", "echo", "--version", "1", cwd=tmp_path)

    assert failed.returncode == 1
    assert "path/to/service.py:ClassName" in failed.stderr
    assert "Traceback" not in failed.stderr


NO_EXPORT_SERVICE = """
from pydantic import BaseModel

import anycast


class Empty(BaseModel):
    pass


class Echo(anycast.Service):
    @anycast.handler
    def predict(self, request: Empty) -> Empty:
        return request
"""


def test_build_with_an_unknown_format_names_the_allowed_ones(tmp_path: Path) -> None:
    (tmp_path / "service.py").write_text(NO_EXPORT_SERVICE)
    failed = _anycast(
        "build", "service.py:Echo", "--name", "echo", "--version", "1", "--format", "tflite",
        cwd=tmp_path,
    )  # fmt: skip

    assert failed.returncode == 1
    assert "--format must be one of torch, onnx, got 'tflite'" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not (tmp_path / "dist").exists()


def test_onnx_build_of_a_service_without_a_model_says_how_to_export_one(tmp_path: Path) -> None:
    (tmp_path / "service.py").write_text(NO_EXPORT_SERVICE)
    failed = _anycast(
        "build", "service.py:Echo", "--name", "echo", "--version", "1", "--format", "onnx",
        cwd=tmp_path,
    )  # fmt: skip

    assert failed.returncode == 1
    message = " ".join(failed.stderr.split())  # rich wraps long lines
    assert "Echo has no exportable model for --format onnx" in message
    assert "define export_model(self) -> tuple[torch.nn.Module, torch.Tensor]" in message
    assert "Traceback" not in failed.stderr
