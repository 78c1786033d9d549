"""Build an artifact tar from a service file, its sibling sources and extra files.

The tar is deterministic: members are sorted and carry fixed metadata, so the same
inputs (on the same Python, torch and Anycast versions) always give the same id and bytes.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import logging
import os
import platform
import tarfile
import tempfile
import traceback
from pathlib import Path
from typing import Any

from anycast.core.errors import AnycastError, IntegrityError, InvalidInput
from anycast.core.names import check_name, check_version
from anycast.registry.artifact import (
    BACKENDS,
    FORMAT,
    MANIFEST,
    ONNX_FILE,
    manifest_id,
    safe_member,
    sha256_file,
)

log = logging.getLogger(__name__)

SERVICE_REF_RULE = "'path/to/service.py:ClassName'"


def split_service_ref(service_ref: str) -> tuple[Path, str]:
    """Split ``path/to/service.py:ClassName`` into the file and the class name."""
    path_text, sep, class_name = service_ref.rpartition(":")
    if not sep or not path_text or not class_name.isidentifier():
        raise InvalidInput(f"service must look like {SERVICE_REF_RULE}, got {service_ref!r}")
    path = Path(path_text)
    if path.suffix != ".py" or not path.is_file():
        raise InvalidInput(f"service file {path} is not an existing .py file")
    return path, class_name


def framework_versions(backend: str = "torch") -> dict[str, str]:
    """Versions of what the artifact was built with: python, torch (if installed), anycast,
    and for the ONNX backend onnx and onnxruntime."""
    versions = {"python": platform.python_version(), "anycast": _version("anycast") or "0.0.0"}
    packages = ["torch", "onnx", "onnxruntime"] if backend == "onnx" else ["torch"]
    for package in packages:
        found = _version(package)
        if found:
            versions[package] = found
    return versions


def check_model_format(model_format: str) -> str:
    if model_format not in BACKENDS:
        raise InvalidInput(
            f"--format must be one of {', '.join(BACKENDS)}, got {model_format!r} "
            "(torch packs the files as given; onnx also exports the model to model.onnx)",
            code="invalid_format",
        )
    return model_format


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _source_files(root: Path) -> dict[str, Path]:
    """Every .py file under ``root``, skipping hidden paths and __pycache__."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if path.is_file():
            found[relative.as_posix()] = path
    return found


def _extra_files(files: dict[str, Path], taken: dict[str, Path]) -> dict[str, Path]:
    extra: dict[str, Path] = {}
    for name, path in files.items():
        try:
            safe_member(name)
        except IntegrityError as exc:
            raise InvalidInput(f"extra file name {name!r} must be a plain relative path") from exc
        if name == MANIFEST or name in taken:
            raise InvalidInput(f"extra file name {name!r} clashes with a file already packed")
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"extra file {name}={path} does not exist or is not a file")
        extra[name] = path
    return extra


def build_manifest(
    service: str, name: str, version: str, members: dict[str, Path], backend: str = "torch"
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": name,
        "version": version,
        "service": service,
        "files": {member: sha256_file(path) for member, path in sorted(members.items())},
        "framework": framework_versions(backend),
        "backend": backend,
    }


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(out: Path, manifest: dict[str, Any], members: dict[str, Path]) -> None:
    """Write ``manifest.json`` first, then the members in sorted order; atomic rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar,
        ):
            data = manifest_bytes(manifest)
            tar.addfile(_tar_info(MANIFEST, len(data)), io.BytesIO(data))
            for member in sorted(members):
                path = members[member]
                with path.open("rb") as fh:
                    tar.addfile(_tar_info(member, path.stat().st_size), fh)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as stored in the tar: indented for people, sorted for determinism."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def build_artifact(
    service_ref: str,
    *,
    name: str,
    version: str,
    files: dict[str, Path] | None = None,
    out_dir: Path,
    model_format: str = "torch",
    require_service: bool = False,
) -> tuple[str, Path]:
    """Pack a service into ``out_dir/<name>-<version>.tar``; return (artifact id, tar path).

    Packs every .py file in the service file's folder (recursively, no hidden files or
    __pycache__) and the ``files`` given as {name in the artifact: path on disk}. With
    ``model_format="onnx"`` it also runs the service's setup() and export_model() and packs
    the exported ``model.onnx``; the manifest's ``backend`` says which of the two it is.
    With ``require_service`` (what `anycast build` passes) a service file that does not load
    as an Anycast service with handlers is refused instead of packed.
    """
    check_name(name, "artifact name")
    check_version(version)
    check_model_format(model_format)
    service_path, class_name = split_service_ref(service_ref)
    root = service_path.parent

    members = _source_files(root)
    members.update(_extra_files(files or {}, members))
    with tempfile.TemporaryDirectory(prefix="anycast-build-") as workdir:
        if model_format == "onnx":
            members[ONNX_FILE] = _export_onnx(service_path, class_name, members, Path(workdir))
        service = f"{service_path.relative_to(root).as_posix()}:{class_name}"
        manifest = build_manifest(service, name, version, members, model_format)
        manifest.update(handler_declarations(service_path, class_name, require_service))
        artifact_id = manifest_id(manifest)

        out = Path(out_dir) / f"{name}-{version}.tar"
        write_tar(out, manifest, members)
    log.info(
        "built artifact %s:%s id=%s backend=%s files=%d at %s",
        name,
        version,
        artifact_id[:12],
        model_format,
        len(members),
        out,
    )
    return artifact_id, out


def handler_declarations(
    service_path: Path, class_name: str, required: bool = False
) -> dict[str, Any]:
    """``{"handlers": {name: {"idempotent", "deterministic"}}}`` for the manifest, or {}.

    The gateway reads them to decide what it may retry and cache. A service file that does
    not import as an Anycast service is still packed, without the entry (the gateway then
    treats every handler as idempotent and not deterministic), unless ``required``: then
    it is refused with InvalidInput saying what is wrong with it.
    """
    from anycast.sdk import handlers_of
    from anycast.sdk.loader import load_service

    try:
        specs = handlers_of(load_service(f"{service_path.resolve()}:{class_name}"))
    except AnycastError as exc:
        if required:
            raise InvalidInput(
                f"{_load_problem(exc, service_path)}; nothing was built",
                code="invalid_service",
            ) from exc
        log.warning("no handler declarations in the manifest: %s", exc.message)
        return {}
    return {
        "handlers": {
            name: {
                "idempotent": bool(spec.idempotent),
                "deterministic": bool(getattr(spec, "deterministic", False)),
            }
            for name, spec in sorted(specs.items())
        }
    }


def _load_problem(exc: AnycastError, service_path: Path) -> str:
    """Why a service did not load, pointing at the line for errors in the user's file."""
    cause = exc.__cause__
    if isinstance(cause, SyntaxError):
        return f"syntax error at line {cause.lineno} of {cause.filename}: {cause.msg}"
    if cause is None:
        return exc.message
    folder = str(service_path.resolve().parent)
    frames = [f for f in traceback.extract_tb(cause.__traceback__) if f.filename.startswith(folder)]
    where = f" (at line {frames[-1].lineno} of {frames[-1].filename})" if frames else ""
    return f"{exc.message}{where}"


def _export_onnx(
    service_path: Path, class_name: str, members: dict[str, Path], workdir: Path
) -> Path:
    """Run the service's setup() with the torch backend, then export its model to ONNX."""
    # The SDK (and torch) load only here: the control plane imports this package too.
    from anycast.sdk.loader import load_service
    from anycast.sdk.onnx import export_onnx, exported_model, require_export_packages

    require_export_packages()
    if ONNX_FILE in members:
        raise InvalidInput(
            f"--format onnx writes {ONNX_FILE} itself; drop the --file {ONNX_FILE}=... given"
        )
    service_cls = load_service(f"{service_path.resolve()}:{class_name}")
    service = service_cls(files_dir=service_path.parent, files=members)
    service.backend = "torch"  # type: ignore[attr-defined]  # read by anycast.backend_of
    try:
        service.setup()
        model, example = exported_model(service)
    except AnycastError:
        raise
    except Exception as exc:
        log.exception("setup() or export_model() of %s raised during the build", class_name)
        raise InvalidInput(
            f"{class_name}.setup() or export_model() raised while exporting to ONNX: "
            f"{type(exc).__name__}: {exc}",
            code="export_failed",
        ) from exc
    path = export_onnx(model, example, workdir / ONNX_FILE)
    log.info("exported %s's model to ONNX (example input %s)", class_name, list(example.shape))
    return path
