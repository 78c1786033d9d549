"""Building, pushing, pulling and resolving artifacts with the local registry."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from anycast.core.errors import ConfigError, Conflict, IntegrityError, InvalidInput, NotFound
from anycast.registry import (
    FORMAT,
    MANIFEST,
    LocalStorage,
    Registry,
    build_artifact,
    manifest_id,
    verify_dir,
)


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    root = tmp_path / "svc"
    (root / "lib").mkdir(parents=True)
    (root / "service.py").write_text("class Echo:\n    pass\n")
    (root / "helpers.py").write_text("X = 1\n")
    (root / "lib" / "util.py").write_text("Y = 2\n")
    (root / "notes.txt").write_text("not packed\n")
    (root / ".hidden.py").write_text("not packed\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "service.cpython-311.pyc").write_bytes(b"\0")
    (root / "__pycache__" / "stray.py").write_text("not packed\n")
    (tmp_path / "weights.bin").write_bytes(b"\x01\x02" * 1000)
    return root


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(LocalStorage(tmp_path / "registry"))


def _build(service_dir: Path, out: Path, version: str = "1") -> tuple[str, Path]:
    return build_artifact(
        f"{service_dir / 'service.py'}:Echo",
        name="echo",
        version=version,
        files={"weights.bin": service_dir.parent / "weights.bin"},
        out_dir=out,
    )


def _members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def test_build_packs_sources_and_extra_files_with_manifest_first(
    service_dir: Path, tmp_path: Path
) -> None:
    artifact_id, tar_path = _build(service_dir, tmp_path / "dist")

    assert tar_path == tmp_path / "dist" / "echo-1.tar"
    names = _members(tar_path)
    assert names[0] == MANIFEST
    assert sorted(names[1:]) == ["helpers.py", "lib/util.py", "service.py", "weights.bin"]
    with tarfile.open(tar_path) as tar:
        manifest = json.load(tar.extractfile(MANIFEST))  # type: ignore[arg-type]
    assert manifest_id(manifest) == artifact_id
    assert manifest["format"] == FORMAT
    assert manifest["service"] == "service.py:Echo"
    assert {"python", "torch", "anycast"} <= set(manifest["framework"])


def test_build_is_deterministic(service_dir: Path, tmp_path: Path) -> None:
    first_id, first = _build(service_dir, tmp_path / "a")
    second_id, second = _build(service_dir, tmp_path / "b")

    assert first_id == second_id
    assert first.read_bytes() == second.read_bytes()


def test_build_id_changes_with_content(service_dir: Path, tmp_path: Path) -> None:
    first_id, _ = _build(service_dir, tmp_path / "a")
    (service_dir / "helpers.py").write_text("X = 2\n")

    assert _build(service_dir, tmp_path / "b")[0] != first_id


@pytest.mark.parametrize(
    ("ref", "message"),
    [("service.py", "path/to/service.py:ClassName"), ("missing.py:Echo", "not an existing")],
)
def test_build_refuses_bad_service_ref(tmp_path: Path, ref: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        build_artifact(ref, name="echo", version="1", out_dir=tmp_path)


def test_build_refuses_bad_names_and_extra_files(service_dir: Path, tmp_path: Path) -> None:
    ref = f"{service_dir / 'service.py'}:Echo"
    with pytest.raises(InvalidInput, match="artifact name"):
        build_artifact(ref, name="Bad Name", version="1", out_dir=tmp_path)
    with pytest.raises(InvalidInput, match="plain relative path"):
        build_artifact(ref, name="echo", version="1", files={"../x": service_dir}, out_dir=tmp_path)
    with pytest.raises(InvalidInput, match="clashes"):
        files = {"service.py": service_dir / "helpers.py"}
        build_artifact(ref, name="echo", version="1", files=files, out_dir=tmp_path)


def test_push_then_pull_round_trip(service_dir: Path, tmp_path: Path, registry: Registry) -> None:
    artifact_id, tar_path = _build(service_dir, tmp_path / "dist")

    pushed = registry.push(tar_path)
    unpacked = registry.pull(artifact_id, tmp_path / "region" / "artifacts")

    assert pushed["id"] == artifact_id
    assert (pushed["name"], pushed["version"]) == ("echo", "1")
    assert unpacked == tmp_path / "region" / "artifacts" / artifact_id
    assert verify_dir(unpacked, artifact_id)["name"] == "echo"
    assert (unpacked / "lib" / "util.py").read_text() == "Y = 2\n"
    assert (unpacked / "weights.bin").read_bytes() == b"\x01\x02" * 1000


def test_push_twice_is_a_no_op(service_dir: Path, tmp_path: Path, registry: Registry) -> None:
    _, tar_path = _build(service_dir, tmp_path / "dist")

    assert registry.push(tar_path) == registry.push(tar_path)
    assert len(registry.list()) == 1


def test_pull_reuses_verified_dir_and_repairs_a_tampered_one(
    service_dir: Path, tmp_path: Path, registry: Registry
) -> None:
    artifact_id, tar_path = _build(service_dir, tmp_path / "dist")
    registry.push(tar_path)
    dest = registry.pull(artifact_id, tmp_path / "artifacts")
    marker = dest / "extra-left-alone"
    marker.write_text("still here")

    assert registry.pull(artifact_id, tmp_path / "artifacts") == dest
    assert marker.exists()

    (dest / "service.py").write_text("import os\n")
    registry.pull(artifact_id, tmp_path / "artifacts")
    assert (dest / "service.py").read_text() == "class Echo:\n    pass\n"


def test_pull_unknown_artifact_is_not_found(tmp_path: Path, registry: Registry) -> None:
    with pytest.raises(NotFound, match="anycast push"):
        registry.pull("0" * 64, tmp_path / "artifacts")


def _rewrite(src: Path, dest: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(dest, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dest


def _contents(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda m: [(n, b"evil()\n" if n == "helpers.py" else d) for n, d in m], "checksum"),
        (lambda m: [*m, ("extra.py", b"x")], "not listed"),
        (lambda m: [x for x in m if x[0] != "helpers.py"], "missing"),
        (lambda m: [*m[1:], m[0]], "first member"),
        (lambda m: [*m, ("../escape.py", b"x")], "plain relative path"),
        (lambda m: [*m, ("helpers.py", b"X = 1\n")], "twice"),
        (lambda m: [(MANIFEST, b"{not json"), *m[1:]], "not valid JSON"),
    ],
    ids=["changed-file", "extra-file", "missing-file", "manifest-last", "traversal", "dup", "json"],
)
def test_push_refuses_tampered_tar(
    service_dir: Path, tmp_path: Path, registry: Registry, tamper: object, message: str
) -> None:
    _, tar_path = _build(service_dir, tmp_path / "dist")
    bad = _rewrite(tar_path, tmp_path / "bad.tar", tamper(_contents(tar_path)))  # type: ignore[operator]

    with pytest.raises(IntegrityError, match=message):
        registry.push(bad)
    assert registry.list() == []


def test_push_refuses_a_file_that_is_not_a_tar(tmp_path: Path, registry: Registry) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"hello" * 200)

    with pytest.raises(IntegrityError):
        registry.push(junk)


def test_versions_are_immutable(service_dir: Path, tmp_path: Path, registry: Registry) -> None:
    first_id, first = _build(service_dir, tmp_path / "a")
    registry.push(first)
    (service_dir / "helpers.py").write_text("X = 99\n")
    _, changed = _build(service_dir, tmp_path / "b")

    with pytest.raises(Conflict, match="immutable"):
        registry.push(changed)
    assert registry.resolve("echo:1") == first_id


def test_storage_tag_same_id_is_no_op_other_id_conflicts(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.set_tag("echo", "1", "a" * 64)
    storage.set_tag("echo", "1", "a" * 64)

    with pytest.raises(Conflict, match="versions are immutable"):
        storage.set_tag("echo", "1", "b" * 64)
    assert storage.get_tag("echo", "1") == "a" * 64
    assert [tuple(t) for t in storage.list_tags()] == [("echo", "1", "a" * 64)]


def test_resolve_by_id_prefix_and_name_version(
    service_dir: Path, tmp_path: Path, registry: Registry
) -> None:
    artifact_id, tar_path = _build(service_dir, tmp_path / "dist")
    registry.push(tar_path)

    assert registry.resolve(artifact_id) == artifact_id
    assert registry.resolve(artifact_id[:8]) == artifact_id
    assert registry.resolve("echo:1") == artifact_id
    with pytest.raises(InvalidInput, match="at least 8"):
        registry.resolve(artifact_id[:7])
    with pytest.raises(NotFound, match="anycast push"):
        registry.resolve("echo:2")
    with pytest.raises(NotFound):
        registry.resolve("f" * 12 if not artifact_id.startswith("f" * 12) else "0" * 12)


def test_list_shows_pushed_artifacts(service_dir: Path, tmp_path: Path, registry: Registry) -> None:
    one, first = _build(service_dir, tmp_path / "a", version="1")
    two, second = _build(service_dir, tmp_path / "b", version="2")
    registry.push(first)
    registry.push(second)

    listed = registry.list()

    assert [(a["id"], a["version"]) for a in listed] == [(one, "1"), (two, "2")]
    assert listed[0]["service"] == "service.py:Echo"


# The ONNX backend: `build_artifact(..., model_format="onnx")`.

ONNX_SERVICE = """
import torch
from pydantic import BaseModel

import anycast


class Row(BaseModel):
    values: list[float]


class Scaler(anycast.Service):
    def setup(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)
        self.scale = float(self.file("scale.txt").read_text())

    def export_model(self) -> tuple[torch.nn.Module, torch.Tensor]:
        return torch.nn.Sequential(self.model, torch.nn.Hardtanh(-self.scale, self.scale)), (
            torch.zeros(1, 3)
        )

    @anycast.handler
    def predict(self, request: Row) -> Row:
        return request
"""


@pytest.fixture
def onnx_service(tmp_path: Path) -> Path:
    root = tmp_path / "onnx-svc"
    root.mkdir()
    (root / "service.py").write_text(ONNX_SERVICE)
    (tmp_path / "scale.txt").write_text("0.5\n")
    return root / "service.py"


def _build_onnx(service: Path, out: Path, class_name: str = "Scaler") -> tuple[str, Path]:
    return build_artifact(
        f"{service}:{class_name}",
        name="scaler",
        version="1",
        files={"scale.txt": service.parent.parent / "scale.txt"},
        out_dir=out,
        model_format="onnx",
    )


def test_onnx_build_packs_model_onnx_and_records_the_backend(
    onnx_service: Path, tmp_path: Path, registry: Registry
) -> None:
    artifact_id, tar_path = _build_onnx(onnx_service, tmp_path / "dist")

    assert sorted(_members(tar_path)[1:]) == ["model.onnx", "scale.txt", "service.py"]
    unpacked = registry.pull(registry.push(tar_path)["id"], tmp_path / "region")
    manifest = verify_dir(unpacked, artifact_id)
    assert manifest["backend"] == "onnx"
    assert {"onnx", "onnxruntime", "torch"} <= set(manifest["framework"])
    assert manifest_id(manifest) == artifact_id

    from anycast.sdk.onnx import OnnxModel

    clipped = OnnxModel(unpacked / "model.onnx")(np.full((4, 3), 100.0, dtype=np.float32))
    assert clipped.shape == (4, 2)
    assert np.abs(clipped).max() == pytest.approx(0.5)  # the exported module, scale.txt applied


def test_onnx_build_is_deterministic(onnx_service: Path, tmp_path: Path) -> None:
    first_id, first = _build_onnx(onnx_service, tmp_path / "a")
    second_id, second = _build_onnx(onnx_service, tmp_path / "b")
    assert first_id == second_id
    assert first.read_bytes() == second.read_bytes()


def test_a_torch_build_records_the_torch_backend(service_dir: Path, tmp_path: Path) -> None:
    _, tar_path = _build(service_dir, tmp_path / "dist")
    with tarfile.open(tar_path) as tar:
        manifest = json.load(tar.extractfile(MANIFEST))  # type: ignore[arg-type]
    assert manifest["backend"] == "torch"
    assert "model.onnx" not in manifest["files"]


def test_build_refuses_an_unknown_format_naming_the_allowed_ones(
    service_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="--format must be one of torch, onnx, got 'tflite'"):
        build_artifact(
            f"{service_dir / 'service.py'}:Echo",
            name="echo",
            version="1",
            out_dir=tmp_path,
            model_format="tflite",
        )
    assert not (tmp_path / "echo-1.tar").exists()


def test_onnx_build_of_a_service_without_export_model_says_how_to_add_it(
    onnx_service: Path, tmp_path: Path
) -> None:
    source = onnx_service.read_text().replace("def export_model", "def not_exported")
    onnx_service.write_text(source.replace("class Scaler", "class NoExport"))

    with pytest.raises(InvalidInput, match="NoExport has no exportable model") as raised:
        _build_onnx(onnx_service, tmp_path / "dist", class_name="NoExport")
    assert "export_model(self) -> tuple[torch.nn.Module, torch.Tensor]" in raised.value.message
    assert not (tmp_path / "dist").exists()


def test_onnx_build_refuses_a_service_that_is_not_a_service_or_a_given_model_onnx(
    service_dir: Path, onnx_service: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"not a subclass of anycast\.Service"):
        build_artifact(
            f"{service_dir / 'service.py'}:Echo",
            name="echo",
            version="1",
            out_dir=tmp_path,
            model_format="onnx",
        )
    with pytest.raises(InvalidInput, match=r"writes model\.onnx itself"):
        build_artifact(
            f"{onnx_service}:Scaler",
            name="scaler",
            version="1",
            files={"model.onnx": onnx_service},
            out_dir=tmp_path,
            model_format="onnx",
        )


def test_onnx_build_reports_a_setup_that_raises(onnx_service: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"scale\.txt' not found"):
        build_artifact(
            f"{onnx_service}:Scaler",
            name="scaler",
            version="1",
            out_dir=tmp_path,
            model_format="onnx",
        )
    broken = tmp_path / "broken" / "service.py"
    broken.parent.mkdir()
    broken.write_text(ONNX_SERVICE.replace("class Scaler", "class Broken").replace(
        "torch.manual_seed(0)", "raise RuntimeError('no GPU here')"
    ))  # fmt: skip
    with pytest.raises(InvalidInput, match=r"Broken.setup\(\) or export_model\(\) raised"):
        _build_onnx(broken, tmp_path / "dist", class_name="Broken")


def _rewrite_manifest(root: Path, **changes: object) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    manifest.update(changes)
    (root / MANIFEST).write_text(json.dumps(manifest))


def test_verify_refuses_an_unknown_backend_or_an_onnx_backend_without_its_model(
    service_dir: Path, tmp_path: Path, registry: Registry
) -> None:
    _, tar_path = _build(service_dir, tmp_path / "dist")
    unpacked = registry.pull(registry.push(tar_path)["id"], tmp_path / "region")

    _rewrite_manifest(unpacked, backend="tensorrt")
    with pytest.raises(IntegrityError, match="backend must be one of torch, onnx"):
        verify_dir(unpacked)
    _rewrite_manifest(unpacked, backend="onnx")
    with pytest.raises(IntegrityError, match=r"model\.onnx is not one of its files"):
        verify_dir(unpacked)
