"""The artifact format: a manifest of checksummed files, identified by the manifest's hash.

An artifact is a tar file whose first member is ``manifest.json``; every other member is
listed in the manifest's ``files`` with its SHA-256. The artifact id is the SHA-256 of the
canonical manifest, so an id names exactly one set of bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from anycast.core.errors import IntegrityError

FORMAT = "anycast.artifact/v1"
MANIFEST = "manifest.json"
# What a replica runs: "torch" (the default, also when "backend" is absent) or "onnx", whose
# artifacts carry the exported model as ONNX_FILE. anycast.sdk.onnx reads the same names.
BACKENDS = ("torch", "onnx")
ONNX_FILE = "model.onnx"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def manifest_id(manifest: dict[str, Any]) -> str:
    """The artifact id: SHA-256 of the canonical manifest."""
    return hashlib.sha256(canonical(manifest)).hexdigest()


def safe_member(name: str) -> str:
    """Refuse file names that could escape the artifact directory."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or name != path.as_posix():
        raise IntegrityError(f"artifact file name {name!r} is not a plain relative path")
    return name


def verify_dir(root: Path, expected_id: str | None = None) -> dict[str, Any]:
    """Check an unpacked artifact: manifest hash and every file's checksum.

    Returns the manifest; raises IntegrityError naming the first mismatch.
    """
    manifest_path = root / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{manifest_path} is missing or not JSON") from exc
    if manifest.get("format") != FORMAT:
        raise IntegrityError(f"unknown artifact format {manifest.get('format')!r}, want {FORMAT}")

    actual_id = manifest_id(manifest)
    if expected_id is not None and actual_id != expected_id:
        raise IntegrityError(
            f"manifest hashes to {actual_id[:12]}, not the artifact id {expected_id[:12]}"
        )

    _check_backend(manifest)
    for name, want in sorted(manifest.get("files", {}).items()):
        path = root / safe_member(name)
        if not path.is_file():
            raise IntegrityError(f"artifact file {name} is missing")
        got = sha256_file(path)
        if got != want:
            raise IntegrityError(f"artifact file {name} fails its checksum (tampered or corrupt)")
    return dict(manifest)


def _check_backend(manifest: dict[str, Any]) -> None:
    backend = manifest.get("backend", "torch")
    if backend not in BACKENDS:
        raise IntegrityError(
            f"artifact backend must be one of {', '.join(BACKENDS)}, got {backend!r}"
        )
    if backend == "onnx" and ONNX_FILE not in manifest.get("files", {}):
        raise IntegrityError(f"artifact backend is onnx but {ONNX_FILE} is not one of its files")
