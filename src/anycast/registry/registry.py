"""Push, pull and resolve artifacts over a :class:`RegistryStorage`."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any, BinaryIO

from anycast.core.errors import IntegrityError, InvalidInput, NotFound
from anycast.core.names import check_artifact_id, check_name, check_version
from anycast.registry.artifact import FORMAT, MANIFEST, manifest_id, safe_member, verify_dir
from anycast.registry.storage import RegistryStorage, immutable_tag_conflict

log = logging.getLogger(__name__)

MAX_MANIFEST_BYTES = 1 << 20
MIN_PREFIX = 8
_HEX = re.compile(r"^[0-9a-f]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
PUSH_HINT = "build it with `anycast build` and push it with `anycast push`"


def check_manifest(manifest: Any) -> dict[str, Any]:
    """Check a manifest's shape: format, name, version, service and file checksums."""
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{MANIFEST} must be a JSON object")
    if manifest.get("format") != FORMAT:
        raise IntegrityError(f"unknown artifact format {manifest.get('format')!r}, want {FORMAT}")
    check_name(manifest.get("name"), "artifact name")
    check_version(manifest.get("version"))

    files = manifest.get("files")
    if not isinstance(files, dict):
        raise IntegrityError(f"{MANIFEST} 'files' must map file names to SHA-256 hex digests")
    for name, digest in files.items():
        safe_member(name)
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise IntegrityError(f"checksum of {name} in {MANIFEST} is not a SHA-256 hex digest")

    service = manifest.get("service")
    service_file = service.rpartition(":")[0] if isinstance(service, str) else ""
    if service_file not in files:
        raise IntegrityError(
            f"{MANIFEST} 'service' must be '<file>:<Class>' naming a packed file, got {service!r}"
        )
    return manifest


def _read_manifest(tar: tarfile.TarFile) -> tuple[dict[str, Any], bytes]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise IntegrityError(f"the artifact's first member must be {MANIFEST}")
    if first.size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    reader = tar.extractfile(first)
    raw = reader.read() if reader else b""
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise IntegrityError(f"{MANIFEST} is not valid JSON") from exc
    return check_manifest(manifest), raw


def _copy_member(reader: IO[bytes], dest: Path | None) -> str:
    digest = hashlib.sha256()
    out = dest.open("wb") if dest else None
    try:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            if out:
                out.write(chunk)
    finally:
        if out:
            out.close()
    return digest.hexdigest()


def read_artifact(source: BinaryIO, dest: Path | None = None) -> dict[str, Any]:
    """Stream an artifact tar, checking every member against the manifest.

    With ``dest``, also writes the files there. Returns the manifest; raises IntegrityError
    on a bad member name, a file missing from or not listed in the manifest, or a checksum.
    """
    try:
        with tarfile.open(fileobj=source, mode="r|") as tar:
            manifest, raw = _read_manifest(tar)
            if dest:
                (dest / MANIFEST).write_bytes(raw)
            _read_members(tar, manifest["files"], dest)
    except tarfile.TarError as exc:
        raise IntegrityError(f"not a readable artifact tar: {exc}") from exc
    return manifest


def _read_members(tar: tarfile.TarFile, files: dict[str, str], dest: Path | None) -> None:
    seen: set[str] = set()
    while (member := tar.next()) is not None:
        name = safe_member(member.name.rstrip("/") if member.isdir() else member.name)
        if member.isdir():
            continue
        if not member.isfile():
            raise IntegrityError(f"artifact member {name} is not a regular file")
        if name == MANIFEST or name in seen:
            raise IntegrityError(f"artifact member {name} appears twice")
        if name not in files:
            raise IntegrityError(f"artifact member {name} is not listed in {MANIFEST}")

        reader = tar.extractfile(member)
        if reader is None or _copy_member(reader, _target(dest, name)) != files[name]:
            raise IntegrityError(f"artifact file {name} fails its checksum (tampered or corrupt)")
        seen.add(name)

    missing = sorted(set(files) - seen)
    if missing:
        raise IntegrityError(f"artifact files listed in {MANIFEST} are missing: {missing}")


def _target(dest: Path | None, name: str) -> Path | None:
    if dest is None:
        return None
    target = dest / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IntegrityError(f"artifact member {name} clashes with another member") from exc
    return target


class Registry:
    """Immutable, checksummed artifacts: push a tar, pull it into a folder, resolve refs."""

    def __init__(self, storage: RegistryStorage) -> None:
        self.storage = storage

    def push(self, tar_path: Path) -> dict[str, Any]:
        """Check ``tar_path`` and store it; return {id, name, version, manifest}.

        Pushing the same artifact again is a no-op; a name:version already pointing to
        another id raises Conflict (versions are immutable).
        """
        try:
            with Path(tar_path).open("rb") as fh:
                manifest = read_artifact(fh)
        except FileNotFoundError as exc:
            raise InvalidInput(f"artifact file {tar_path} does not exist") from exc
        artifact_id = manifest_id(manifest)
        name, version = manifest["name"], manifest["version"]

        existing = self.storage.get_tag(name, version)
        if existing is not None and existing != artifact_id:
            raise immutable_tag_conflict(name, version, existing, artifact_id)
        with Path(tar_path).open("rb") as fh:
            self.storage.put_blob(artifact_id, fh)
        self.storage.set_tag(name, version, artifact_id)
        log.info("pushed artifact %s:%s id=%s", name, version, artifact_id[:12])
        return {"id": artifact_id, "name": name, "version": version, "manifest": manifest}

    def manifest(self, artifact_id: str) -> dict[str, Any]:
        """The manifest of a stored artifact (read from the tar's first member)."""
        with self.storage.open_blob(artifact_id) as fh:
            try:
                with tarfile.open(fileobj=fh, mode="r|") as tar:
                    return _read_manifest(tar)[0]
            except tarfile.TarError as exc:
                raise IntegrityError(f"stored artifact {artifact_id} is unreadable") from exc

    def pull(self, artifact_id: str, dest_root: Path) -> Path:
        """Unpack the artifact to ``dest_root/<id>/`` (verified); reuse it if already there."""
        check_artifact_id(artifact_id)
        dest = Path(dest_root) / artifact_id
        if dest.is_dir() and self._verified(dest, artifact_id):
            return dest
        if not self.storage.has_blob(artifact_id):
            raise NotFound(f"artifact {artifact_id} is not in the registry; {PUSH_HINT}")

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{artifact_id[:12]}-"))
        try:
            with self.storage.open_blob(artifact_id) as fh:
                read_artifact(fh, tmp)
            verify_dir(tmp, artifact_id)
            self._install(tmp, dest, artifact_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("pulled artifact %s into %s", artifact_id[:12], dest)
        return dest

    def _verified(self, path: Path, artifact_id: str) -> bool:
        try:
            verify_dir(path, artifact_id)
            return True
        except IntegrityError as exc:
            log.warning("replacing unpacked artifact %s: %s", artifact_id[:12], exc.message)
            return False

    def _install(self, tmp: Path, dest: Path, artifact_id: str) -> None:
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:
            # Another puller won the race; theirs is as good as ours once verified.
            verify_dir(dest, artifact_id)

    def resolve(self, ref: str) -> str:
        """An artifact id from a full id, a unique id prefix (8+ hex digits) or name:version."""
        if ":" in ref:
            name, _, version = ref.partition(":")
            found = self.storage.get_tag(check_name(name, "artifact name"), check_version(version))
            if found is None:
                raise NotFound(f"no artifact {ref} in the registry; {PUSH_HINT}")
            return found
        if len(ref) < MIN_PREFIX or not _HEX.match(ref):
            raise InvalidInput(
                f"artifact reference must be an id, an id prefix of at least {MIN_PREFIX} "
                f"lowercase hex digits, or name:version; got {ref!r}"
            )
        matches = [blob for blob in self.storage.list_blobs() if blob.startswith(ref)]
        if not matches:
            raise NotFound(f"no artifact with id {ref} in the registry; {PUSH_HINT}")
        if len(matches) > 1:
            raise InvalidInput(f"artifact id prefix {ref} is ambiguous; give more digits")
        return matches[0]

    def list(self) -> list[dict[str, Any]]:
        """Every tagged artifact: {id, name, version, service, framework}."""
        items = []
        for tag in self.storage.list_tags():
            manifest = self.manifest(tag.id) if self.storage.has_blob(tag.id) else {}
            items.append(
                {
                    "id": tag.id,
                    "name": tag.name,
                    "version": tag.version,
                    "service": manifest.get("service"),
                    "framework": manifest.get("framework", {}),
                }
            )
        return items
