"""Backups of a cluster: the control-plane store and the registry in one checksummed tar.

A backup is a tar whose first member is ``backup.json``::

    {
      "format": "anycast.backup/v1",
      "created_at": 1796300000.0,
      "anycast": "0.1.0",
      "revision": 42,
      "counts": {"deployments": 1, "artifacts": 1, "regions": 3, "blobs": 1, "tags": 1},
      "members": {"control/state.db": {"sha256": "...", "size": 28672}, ...}
    }

followed by ``control/state.db`` (a consistent snapshot made with SQLite's online backup
API, never a copy of the live file and its WAL), ``registry/blobs/<id>.tar``,
``registry/tags/<name>/<version>`` and, if the home has one, ``cluster.yaml``.

The store is snapshotted before the registry is listed: an artifact is stored in the
registry before it is registered with the control plane, and blobs are never deleted, so
every artifact the snapshot names has its blob in the backup.

Restore reads the whole backup once and checks every member against the manifest before it
writes anything; it then unpacks into a staging folder (checking again), installs the
registry's blobs and tags, and swaps the store in with one rename. The control plane of
the home must be stopped: restore refuses while a process has the store open.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

import anycast
from anycast.control.store import SQLiteStore
from anycast.core.config import ClusterConfig, load_config
from anycast.core.errors import AnycastError, ConfigError, Conflict, IntegrityError, InvalidInput
from anycast.core.names import check_artifact_id, check_name, check_version
from anycast.registry.storage import LocalStorage, immutable_tag_conflict

log = logging.getLogger(__name__)

FORMAT = "anycast.backup/v1"
MANIFEST = "backup.json"
STORE_MEMBER = "control/state.db"
CONFIG_MEMBER = "cluster.yaml"
BLOBS = "registry/blobs/"
TAGS = "registry/tags/"
MAX_MANIFEST_BYTES = 16 << 20
CHUNK = 1 << 20
# Observed state names processes of the old cluster; agents report it again after a restore.
OBSERVED_KINDS = ("replicas",)
DESIRED_KINDS = ("deployments", "artifacts")

MAX_TAG_BYTES = 1024

_BLOB = re.compile(r"^registry/blobs/[0-9a-f]{64}\.tar$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# (what is being done, bytes done, bytes in all) for progress bars.
Progress = Callable[[str, int, int], None]


def _no_progress(what: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class BackupInfo:
    """What a backup holds, as read from (and checked against) its manifest."""

    path: Path
    revision: int
    created_at: float
    counts: dict[str, int]
    members: dict[str, dict[str, Any]]
    tags: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(int(m["size"]) for m in self.members.values())


@dataclass(frozen=True)
class RestoreResult:
    backup: BackupInfo
    revision: int
    blobs_added: int
    tags_added: int
    replaced_store: Path | None = None
    warnings: list[str] = field(default_factory=list)


# -- create ----------------------------------------------------------------------------------


def create_backup(
    config: ClusterConfig, out: Path, progress: Progress = _no_progress
) -> BackupInfo:
    """Write a backup of ``config``'s home to ``out`` (atomically); safe while it runs."""
    out = Path(out)
    if out.exists():
        raise InvalidInput(f"{out} already exists; choose another --out or remove it first")
    if not config.control_db.is_file():
        raise ConfigError(
            f"no control-plane store at {config.control_db}; nothing to back up "
            "(start the cluster with `anycast up` or pass the right --home)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".backup-") as work:
        snapshot = Path(work) / "state.db"
        revision, counts = _snapshot(config.control_db, snapshot)
        sources = _sources(config, snapshot, counts)
        members = _checksums(sources, progress)
        manifest = {
            "format": FORMAT,
            "created_at": round(time.time(), 3),
            "anycast": anycast.__version__,
            "revision": revision,
            "counts": counts,
            "members": members,
        }
        _write_tar(out, manifest, sources, progress)
    log.info("backup of %s at revision %d written to %s", config.home, revision, out)
    return _info(out, manifest, {})


def _snapshot(db: Path, dest: Path) -> tuple[int, dict[str, int]]:
    store = SQLiteStore(db)
    try:
        revision = store.snapshot(dest)
    finally:
        store.close()
    copy = SQLiteStore(dest)
    try:
        counts = {kind: len(copy.list(kind)) for kind in (*DESIRED_KINDS, "regions")}
    finally:
        copy.close()
    _single_file(dest)
    return revision, counts


def _single_file(db: Path) -> None:
    """Checkpoint ``db`` into its main file and leave no WAL beside it."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()


def _sources(config: ClusterConfig, snapshot: Path, counts: dict[str, int]) -> dict[str, Any]:
    """Member name -> a file Path, or bytes for small members (tags)."""
    storage = LocalStorage(config.registry_dir)
    sources: dict[str, Any] = {STORE_MEMBER: snapshot}
    config_file = config.home / CONFIG_MEMBER
    if config_file.is_file():
        sources[CONFIG_MEMBER] = config_file.read_bytes()
    blobs = storage.list_blobs()
    for blob in blobs:
        sources[f"{BLOBS}{blob}.tar"] = storage.blobs / f"{blob}.tar"
    tags = storage.list_tags()
    for tag in tags:
        sources[f"{TAGS}{tag.name}/{tag.version}"] = tag.id.encode()
    counts.update(blobs=len(blobs), tags=len(tags))
    return sources


def _size(source: Any) -> int:
    return len(source) if isinstance(source, bytes) else Path(source).stat().st_size


@contextlib.contextmanager
def _open_source(source: Any) -> Iterator[BinaryIO]:
    if isinstance(source, bytes):
        yield io.BytesIO(source)
        return
    with Path(source).open("rb") as fh:
        yield fh


def _checksums(sources: dict[str, Any], progress: Progress) -> dict[str, dict[str, Any]]:
    total, done = sum(_size(s) for s in sources.values()), 0
    members = {}
    for name, source in sources.items():
        digest = hashlib.sha256()
        size = 0
        with _open_source(source) as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                done += len(chunk)
                progress("checksumming", done, total)
        members[name] = {"sha256": digest.hexdigest(), "size": size}
    return members


def _write_tar(
    out: Path, manifest: dict[str, Any], sources: dict[str, Any], progress: Progress
) -> None:
    raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
    total = sum(int(m["size"]) for m in manifest["members"].values())
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        progress("writing", done[0], total)

    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}-")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                _add(tar, MANIFEST, io.BytesIO(raw), len(raw))
                for member, source in sources.items():
                    expected = manifest["members"][member]
                    with _open_source(source) as src:
                        reader = _Hashing(src, advance)
                        _add(tar, member, reader, int(expected["size"]))
                    if reader.hexdigest() != expected["sha256"]:
                        raise IntegrityError(f"{member} changed while the backup was written")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _add(tar: tarfile.TarFile, name: str, fileobj: Any, size: int) -> None:
    """Add ``size`` bytes read from ``fileobj`` (anything with ``read``) as ``name``."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, fileobj)


class _Hashing:
    """A reader that hashes what passes through it and reports progress."""

    def __init__(self, source: BinaryIO, advance: Callable[[int], None]) -> None:
        self._source = source
        self._advance = advance
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        self._digest.update(chunk)
        self._advance(len(chunk))
        return chunk

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


# -- verify ----------------------------------------------------------------------------------


def verify_backup(path: Path, progress: Progress = _no_progress) -> BackupInfo:
    """Read the whole backup and check every member; raise IntegrityError on any mismatch."""
    return _read_backup(Path(path), None, progress, "verifying")


def _read_backup(path: Path, dest: Path | None, progress: Progress, what: str) -> BackupInfo:
    try:
        with path.open("rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            manifest = _read_manifest(tar, path)
            tags = _read_members(tar, path, manifest["members"], dest, progress, what)
    except FileNotFoundError as exc:
        raise InvalidInput(f"backup file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise InvalidInput(f"{path} is a folder; give a backup file") from exc
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise IntegrityError(
            f"backup {path} is truncated or not an Anycast backup ({exc}); nothing was restored"
        ) from exc
    return _info(path, manifest, tags)


def _read_manifest(tar: tarfile.TarFile, path: Path) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise IntegrityError(
            f"{path} is not an Anycast backup: its first member must be {MANIFEST}"
        )
    if first.size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{MANIFEST} in {path} is larger than {MAX_MANIFEST_BYTES} bytes")
    reader = tar.extractfile(first)
    try:
        manifest = json.loads(reader.read() if reader else b"")
    except ValueError as exc:
        raise IntegrityError(f"{MANIFEST} in {path} is not valid JSON") from exc
    return _check_manifest(manifest, path)


def _check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise IntegrityError(f"{path} has backup format {found!r}; this Anycast reads {FORMAT}")
    members = manifest.get("members")
    if not isinstance(members, dict) or STORE_MEMBER not in members:
        raise IntegrityError(f"{MANIFEST} in {path} does not list {STORE_MEMBER}")
    for name, entry in members.items():
        _check_member_name(name, path)
        ok = isinstance(entry, dict) and isinstance(entry.get("size"), int)
        if not ok or not _SHA256.match(str(entry.get("sha256"))):
            raise IntegrityError(f"{MANIFEST} in {path} has no SHA-256 and size for {name}")
    if not isinstance(manifest.get("revision"), int):
        raise IntegrityError(f"{MANIFEST} in {path} has no store revision")
    return manifest


def _check_member_name(name: str, path: Path) -> None:
    if name in (STORE_MEMBER, CONFIG_MEMBER) or _BLOB.match(name) or _tag_of(name):
        return
    raise IntegrityError(f"{path} holds an unexpected member {name!r}; refusing it")


def _tag_of(name: str) -> tuple[str, str] | None:
    """(artifact name, version) of a tag member, None if ``name`` is not one."""
    parts = PurePosixPath(name).parts
    if not name.startswith(TAGS) or len(parts) != 4:
        return None
    try:
        return check_name(parts[2], "artifact name"), check_version(parts[3])
    except InvalidInput:
        return None


def _read_members(
    tar: tarfile.TarFile,
    path: Path,
    members: dict[str, dict[str, Any]],
    dest: Path | None,
    progress: Progress,
    what: str,
) -> dict[tuple[str, str], str]:
    """Check (and with ``dest`` unpack) every member; return the tags it holds."""
    total = sum(int(m["size"]) for m in members.values())
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        progress(what, done[0], total)

    seen: set[str] = set()
    tags: dict[tuple[str, str], str] = {}
    while (member := tar.next()) is not None:
        name = member.name
        if name not in members or name in seen or not member.isfile():
            raise IntegrityError(f"{path} holds an unexpected or repeated member {name!r}")
        reader = tar.extractfile(member)
        assert reader is not None  # a regular file always has a reader
        tag = _tag_of(name)
        if tag is not None:
            reader = _read_tag(reader, tag, tags, path)
        digest, size = _copy(reader, _target(dest, name), advance)
        expected = members[name]
        if (digest, size) != (expected["sha256"], expected["size"]):
            raise IntegrityError(
                f"backup {path} is corrupt: {name} fails its SHA-256 check "
                f"({size} bytes, sha256 {digest[:16]}..., manifest says {expected['size']} bytes, "
                f"{expected['sha256'][:16]}...); nothing was restored"
            )
        seen.add(name)
    missing = sorted(set(members) - seen)
    if missing:
        raise IntegrityError(
            f"backup {path} is truncated: {len(missing)} member(s) listed in {MANIFEST} are "
            f"missing, first {missing[0]}; nothing was restored"
        )
    return tags


def _read_tag(
    reader: IO[bytes], tag: tuple[str, str], tags: dict[tuple[str, str], str], path: Path
) -> IO[bytes]:
    raw = reader.read(MAX_TAG_BYTES)
    try:
        tags[tag] = check_artifact_id(raw.decode(errors="replace").strip())
    except InvalidInput as exc:
        raise IntegrityError(f"tag {tag[0]}:{tag[1]} in {path} does not hold an id") from exc
    return io.BytesIO(raw)


def _target(dest: Path | None, name: str) -> Path | None:
    if dest is None:
        return None
    target = dest / name
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _copy(reader: IO[bytes], dest: Path | None, advance: Callable[[int], None]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    out = dest.open("wb") if dest else None
    try:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            advance(len(chunk))
            if out:
                out.write(chunk)
        if out:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out:
            out.close()
    return digest.hexdigest(), size


def _info(path: Path, manifest: dict[str, Any], tags: dict[tuple[str, str], str]) -> BackupInfo:
    return BackupInfo(
        path=path,
        revision=int(manifest["revision"]),
        created_at=float(manifest.get("created_at") or 0),
        counts={k: int(v) for k, v in (manifest.get("counts") or {}).items()},
        members=manifest["members"],
        tags=tags,
    )


# -- restore ---------------------------------------------------------------------------------


def store_users(db: Path) -> list[int]:
    """Pids of the processes that have the store ``db`` (or its WAL) open.

    Limitation: reads /proc, so it sees only this machine's processes of users whose file
    descriptors we may read, and nothing on systems without /proc.
    """
    names = {str(Path(db).resolve()) + suffix for suffix in ("", "-wal", "-shm")}
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        if int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in names for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
    return sorted(pids)


def check_store_unused(config: ClusterConfig) -> None:
    """Refuse (Conflict) while a control plane has ``config``'s store open."""
    pids = store_users(config.control_db)
    if pids:
        raise Conflict(
            f"the control plane of {config.home} is running (pid {pids[0]} has "
            f"{config.control_db} open); stop it first (`anycast down`), then restore",
            code="control_plane_running",
        )


def restore_backup(
    path: Path, config: ClusterConfig, *, force: bool = False, progress: Progress = _no_progress
) -> RestoreResult:
    """Restore the backup at ``path`` into ``config``'s home; the control plane must be down.

    Every member is checked before anything is written. A home whose store already holds
    deployments or artifacts is only replaced with ``force`` (the old store is kept beside
    it). Blobs and tags are added to the registry; a tag pointing to another id is refused.
    """
    path = Path(path)
    check_store_unused(config)
    info = _read_backup(path, None, progress, "verifying")
    previous = _existing_revision(config, force)
    storage = LocalStorage(config.registry_dir)
    _check_tags(info, storage)

    config.home.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=config.home, prefix=".restore-"))
    try:
        # What is installed is what this second pass checked, even if the file was swapped.
        info = _read_backup(path, staging, progress, "restoring")
        _check_tags(info, storage)
        revision, wanted_regions = _prepare_store(staging / STORE_MEMBER, previous, path)
        blobs, tags = _install_registry(info, staging, storage)
        check_store_unused(config)
        replaced = _install_store(staging / STORE_MEMBER, config.control_db)
        _install_config(staging, config)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("restored %s into %s at revision %d", path, config.home, revision)
    warnings = _region_warnings(config, wanted_regions)
    return RestoreResult(info, revision, blobs, tags, replaced, warnings)


def _existing_revision(config: ClusterConfig, force: bool) -> int:
    """The current store's revision (0 if none); refuses to replace real state without force."""
    db = config.control_db
    if not db.exists():
        return 0
    try:
        revision, held = _store_contents(db)
    except (AnycastError, sqlite3.Error) as exc:
        if force:
            log.warning("replacing the unreadable store %s: %s", db, exc)
            return 0
        raise ConfigError(
            f"{db} exists but cannot be read ({exc}); pass --force to replace it"
        ) from exc
    if any(held.values()) and not force:
        raise Conflict(
            f"{db} already holds {held['deployments']} deployment(s) and {held['artifacts']} "
            "artifact(s); restoring replaces them: pass --force (the current store is kept "
            "beside it as state.db.replaced-<time>)",
            code="store_not_empty",
        )
    return revision


def _store_contents(db: Path) -> tuple[int, dict[str, int]]:
    store = SQLiteStore(db)
    try:
        return store.revision(), {kind: len(store.list(kind)) for kind in DESIRED_KINDS}
    finally:
        store.close()


def _check_tags(info: BackupInfo, storage: LocalStorage) -> None:
    """Refuse before writing anything if a tag here points to another id (immutable)."""
    for (name, version), wanted in info.tags.items():
        existing = storage.get_tag(name, version)
        if existing is not None and existing != wanted:
            raise immutable_tag_conflict(name, version, existing, wanted)


def _prepare_store(db: Path, previous: int, path: Path) -> tuple[int, set[str]]:
    """Drop observed replicas and lift the revision above every one watchers have seen.

    Returns the new revision and the regions the restored deployments want replicas in.
    """
    try:
        return _lift_store(db, previous)
    except (AnycastError, sqlite3.Error) as exc:
        message = exc.message if isinstance(exc, AnycastError) else str(exc)
        raise IntegrityError(
            f"{STORE_MEMBER} in {path} is not a readable control-plane store ({message}); "
            "nothing was restored"
        ) from exc


def _lift_store(db: Path, previous: int) -> tuple[int, set[str]]:
    store = SQLiteStore(db)
    try:
        for kind in OBSERVED_KINDS:
            for record in store.list(kind):
                store.delete(kind, record.key)
        revision = store.advance_revision(max(store.revision(), previous) + 1)
        wanted = {
            region
            for record in store.list("deployments")
            for region, count in record.value.get("replicas", {}).items()
            if count
        }
    finally:
        store.close()
    _single_file(db)
    return revision, wanted


def _install_registry(info: BackupInfo, staging: Path, storage: LocalStorage) -> tuple[int, int]:
    blobs = tags = 0
    for name in info.members:
        blob_id = name.removeprefix(BLOBS).removesuffix(".tar")
        if name.startswith(BLOBS) and not storage.has_blob(blob_id):
            with (staging / name).open("rb") as fh:
                storage.put_blob(blob_id, fh)
            blobs += 1
    for (name, version), blob_id in info.tags.items():
        if storage.get_tag(name, version) is None:
            storage.set_tag(name, version, blob_id)
            tags += 1
    return blobs, tags


def _install_store(staged: Path, db: Path) -> Path | None:
    """Swap the staged store in with one rename, keeping any current one beside it."""
    db.parent.mkdir(parents=True, exist_ok=True)
    replaced = None
    if db.exists():
        replaced = db.with_name(f"{db.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(db, replaced)
        wal = db.with_name(db.name + "-wal")
        if wal.exists():
            os.replace(wal, replaced.with_name(replaced.name + "-wal"))
    db.with_name(db.name + "-shm").unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.restoring")
    shutil.copyfile(staged, tmp)
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, db)
    _fsync_dir(db.parent)
    return replaced


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install_config(staging: Path, config: ClusterConfig) -> None:
    """Bring back cluster.yaml only into a home that has none (ports may differ here)."""
    staged = staging / CONFIG_MEMBER
    target = config.home / CONFIG_MEMBER
    if staged.is_file() and not target.exists():
        shutil.copyfile(staged, target)


def _region_warnings(config: ClusterConfig, wanted: set[str]) -> list[str]:
    current = {r.name for r in load_config(config.home).regions}
    missing = sorted(wanted - current)
    if not missing:
        return []
    return [
        f"deployments want replicas in {', '.join(missing)}, which this cluster's "
        f"{CONFIG_MEMBER} does not run; add those regions to it or redeploy"
    ]
