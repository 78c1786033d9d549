"""Where the registry keeps blobs and tags: a small interface and its local-disk backend.

Layout of every backend, relative to its root::

    blobs/<id>.tar            the artifact tar, named by its id
    tags/<name>/<version>     a text file holding the id it points to (never changes)

The interface only streams bytes and reads/writes small files, so a backend over an fsspec
URL (s3://, gs://, ...) can implement it without the registry changing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from anycast.core.errors import ConfigError, Conflict, NotFound
from anycast.core.names import check_artifact_id, check_name, check_version

log = logging.getLogger(__name__)


class Tag(NamedTuple):
    name: str
    version: str
    id: str


class RegistryStorage(Protocol):
    """Blob and tag storage. Blobs are write-once; tags are immutable once set."""

    def put_blob(self, blob_id: str, source: BinaryIO) -> None: ...

    def has_blob(self, blob_id: str) -> bool: ...

    def open_blob(self, blob_id: str) -> contextlib.AbstractContextManager[BinaryIO]: ...

    def get_blob(self, blob_id: str, dest: Path) -> Path: ...

    def list_blobs(self) -> list[str]: ...

    def set_tag(self, name: str, version: str, blob_id: str) -> None: ...

    def get_tag(self, name: str, version: str) -> str | None: ...

    def list_tags(self) -> list[Tag]: ...


def immutable_tag_conflict(name: str, version: str, existing: str, new: str) -> Conflict:
    return Conflict(
        f"{name}:{version} already points to artifact {existing[:12]}, not {new[:12]}; "
        "versions are immutable, so build and push a new --version",
        code="immutable_version",
        id=existing,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """Registry storage in a local folder; every write is a temp file plus an atomic rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tags = self.root / "tags"

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _blob_path(self, blob_id: str) -> Path:
        return self.blobs / f"{check_artifact_id(blob_id)}.tar"

    def _tag_path(self, name: str, version: str) -> Path:
        return self.tags / check_name(name, "artifact name") / check_version(version)

    @contextlib.contextmanager
    def _temp_file(self, folder: Path) -> Iterator[tuple[BinaryIO, Path]]:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh, tmp
        finally:
            tmp.unlink(missing_ok=True)

    def put_blob(self, blob_id: str, source: BinaryIO) -> None:
        """Store the bytes of ``source`` as ``blob_id``; a blob already there is kept."""
        dest = self._blob_path(blob_id)
        if dest.exists():
            return
        with self._temp_file(self.blobs) as (fh, tmp):
            shutil.copyfileobj(source, fh, 1 << 20)
            fh.flush()
            os.fsync(fh.fileno())
            os.replace(tmp, dest)
        _fsync_dir(self.blobs)
        log.debug("stored blob %s", blob_id[:12])

    def has_blob(self, blob_id: str) -> bool:
        return self._blob_path(blob_id).is_file()

    def open_blob(self, blob_id: str) -> contextlib.AbstractContextManager[BinaryIO]:
        path = self._blob_path(blob_id)
        try:
            return path.open("rb")
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {blob_id} is not in the registry at {self.root}") from exc

    def get_blob(self, blob_id: str, dest: Path) -> Path:
        with self.open_blob(blob_id) as src, self._temp_file(Path(dest).parent) as (fh, tmp):
            shutil.copyfileobj(src, fh, 1 << 20)
            fh.close()
            os.replace(tmp, dest)
        return Path(dest)

    def list_blobs(self) -> list[str]:
        if not self.blobs.is_dir():
            return []
        return sorted(p.stem for p in self.blobs.glob("*.tar") if not p.name.startswith("."))

    def set_tag(self, name: str, version: str, blob_id: str) -> None:
        """Point name:version at ``blob_id``; the same id again is a no-op, another is refused."""
        check_artifact_id(blob_id)
        dest = self._tag_path(name, version)
        with self._temp_file(dest.parent) as (fh, tmp):
            fh.write(blob_id.encode())
            fh.flush()
            os.fsync(fh.fileno())
            try:
                # A hard link fails if the tag exists: create-if-absent, atomically.
                os.link(tmp, dest)
            except FileExistsError:
                existing = self.get_tag(name, version)
                if existing != blob_id:
                    raise immutable_tag_conflict(name, version, existing or "?", blob_id) from None
                return
        _fsync_dir(dest.parent)
        log.info("tagged %s:%s -> %s", name, version, blob_id[:12])

    def get_tag(self, name: str, version: str) -> str | None:
        try:
            return self._tag_path(name, version).read_text().strip()
        except FileNotFoundError:
            return None

    def list_tags(self) -> list[Tag]:
        if not self.tags.is_dir():
            return []
        tags = []
        for path in sorted(self.tags.glob("*/*")):
            if path.name.startswith(".") or not path.is_file():
                continue
            tags.append(Tag(path.parent.name, path.name, path.read_text().strip()))
        return tags


def open_storage(location: str | Path) -> RegistryStorage:
    """The storage for a registry location: a local folder (or ``file://`` URL)."""
    text = str(location)
    if text.startswith("file://"):
        return LocalStorage(Path(text.removeprefix("file://")))
    if "://" in text:
        # Limitation: only local folders for now; an fsspec backend would plug in here.
        raise ConfigError(f"registry location {text!r} is not supported; use a local folder")
    return LocalStorage(Path(text))
