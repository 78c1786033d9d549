"""The control plane's store: JSON objects by kind and key, with revisions and CAS.

Like etcd, the store has one revision counter. Every write bumps it in the same
transaction and stamps the object with it, so ``revision`` orders all changes and
``wait(after)`` lets a watcher sleep until something newer than what it has seen exists.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from anycast.core.errors import ConfigError, Conflict, NotFound, Unavailable

# How often wait() re-reads the revision, to notice writes made by other processes.
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Record:
    kind: str
    key: str
    value: dict[str, Any]
    revision: int
    created_revision: int


class Store(Protocol):
    """Objects by (kind, key) with a store-wide revision and compare-and-set writes.

    ``expected_revision``: None writes unconditionally, 0 requires that the object does not
    exist, N requires that its revision is N. A mismatch raises Conflict whose
    ``details["revision"]`` is the object's current revision (0 if absent).
    """

    def get(self, kind: str, key: str) -> Record | None: ...

    def list(self, kind: str, prefix: str = "") -> list[Record]: ...

    def put(
        self, kind: str, key: str, value: dict[str, Any], expected_revision: int | None = None
    ) -> Record: ...

    def delete(self, kind: str, key: str, expected_revision: int | None = None) -> Record: ...

    def revision(self) -> int: ...

    def wait(self, after: int, timeout: float) -> int: ...

    def close(self) -> None: ...


def cas_conflict(kind: str, key: str, expected: int, current: int) -> Conflict:
    if expected == 0:
        what = f"{kind}/{key} already exists (revision {current})"
    elif current == 0:
        what = f"{kind}/{key} does not exist"
    else:
        what = f"{kind}/{key} is at revision {current}"
    return Conflict(
        f"{what}, not at the expected revision {expected}; re-read it and retry",
        revision=current,
    )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    revision INTEGER NOT NULL,
    created_revision INTEGER NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
"""


class SQLiteStore:
    """A :class:`Store` in one SQLite file (WAL, fsync on every commit).

    Safe to share between threads; several processes may open the same file, each write
    takes SQLite's write lock so revisions stay unique and CAS stays exact.

    Durability: ``journal_mode=WAL`` with ``synchronous=FULL``. A write returns only after
    its transaction is in the WAL and the WAL is fsynced, so an acknowledged write survives
    a ``kill -9`` of the control plane and a power loss. (``NORMAL`` would survive a process
    kill too, since the WAL is written before the commit returns, but could lose the last
    commits on power loss; a control plane writes little, so the fsync is cheap.)
    """

    def __init__(self, path: Path | str, *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the control-plane store {self.path}: {exc}") from exc
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._closed = False

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            self._db.close()

    def get(self, kind: str, key: str) -> Record | None:
        with self._lock:
            row = self._db.execute(
                "SELECT kind, key, value, revision, created_revision FROM objects "
                "WHERE kind = ? AND key = ?",
                (kind, key),
            ).fetchone()
        return _record(row) if row else None

    def list(self, kind: str, prefix: str = "") -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, key, value, revision, created_revision FROM objects "
                "WHERE kind = ? AND substr(key, 1, ?) = ? ORDER BY key",
                (kind, len(prefix), prefix),
            ).fetchall()
        return [_record(row) for row in rows]

    def revision(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(row[0])

    def put(
        self, kind: str, key: str, value: dict[str, Any], expected_revision: int | None = None
    ) -> Record:
        data = json.dumps(value, sort_keys=True)
        with self._changed:
            self._begin()
            try:
                current = self._current(kind, key)
                _check_expected(kind, key, expected_revision, current)
                revision = self._bump()
                created = current[1] if current else revision
                self._db.execute(
                    "INSERT OR REPLACE INTO objects (kind, key, value, revision, created_revision)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (kind, key, data, revision, created),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._changed.notify_all()
        return Record(kind, key, json.loads(data), revision, created)

    def delete(self, kind: str, key: str, expected_revision: int | None = None) -> Record:
        """Remove an object and return it as it was; NotFound if it does not exist."""
        with self._changed:
            self._begin()
            try:
                row = self._db.execute(
                    "SELECT kind, key, value, revision, created_revision FROM objects "
                    "WHERE kind = ? AND key = ?",
                    (kind, key),
                ).fetchone()
                current = (row[3], row[4]) if row else None
                _check_expected(kind, key, expected_revision, current)
                if row is None:
                    raise NotFound(f"{kind}/{key} does not exist")
                self._bump()
                self._db.execute("DELETE FROM objects WHERE kind = ? AND key = ?", (kind, key))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._changed.notify_all()
        return _record(row)

    def wait(self, after: int, timeout: float) -> int:
        """Block until the revision exceeds ``after`` or ``timeout`` s pass; return it."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while True:
                if self._closed:
                    return after
                current = self.revision()
                remaining = deadline - time.monotonic()
                if current > after or remaining <= 0:
                    return current
                self._changed.wait(min(remaining, POLL_SECONDS))

    def snapshot(self, dest: Path | str) -> int:
        """Write a consistent copy of the store to ``dest``; return the copy's revision.

        Uses SQLite's online backup API inside one read transaction, so writers (in this
        or other processes) go on meanwhile and the copy is the store at one revision. The
        copy is a single self-contained file (rollback journal, no WAL beside it).
        """
        target = sqlite3.connect(dest)
        try:
            with self._lock:
                self._db.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")
            row = target.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        except sqlite3.Error as exc:
            raise Unavailable(
                f"cannot snapshot the control-plane store {self.path}: {exc}"
            ) from exc
        finally:
            target.close()
        return int(row[0])

    def advance_revision(self, at_least: int) -> int:
        """Raise the store revision to ``at_least`` if it is lower; return the revision.

        A restored store starts above every revision its watchers may have seen, so their
        long-polls (``wait(after)``) notice the restored state instead of sleeping on it.
        """
        with self._changed:
            self._begin()
            try:
                self._db.execute(
                    "UPDATE meta SET value = max(value, ?) WHERE name = 'revision'", (at_least,)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._changed.notify_all()
        return self.revision()

    def _begin(self) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"the control-plane store {self.path} is busy: {exc}") from exc

    def _current(self, kind: str, key: str) -> tuple[int, int] | None:
        row = self._db.execute(
            "SELECT revision, created_revision FROM objects WHERE kind = ? AND key = ?",
            (kind, key),
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    def _bump(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        row = self._db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(row[0])


def _check_expected(
    kind: str, key: str, expected: int | None, current: tuple[int, int] | None
) -> None:
    if expected is None:
        return
    revision = current[0] if current else 0
    if revision != expected:
        raise cas_conflict(kind, key, expected, revision)


def _record(row: tuple[Any, ...]) -> Record:
    return Record(row[0], row[1], json.loads(row[2]), int(row[3]), int(row[4]))


def open_store(location: str | Path) -> Store:
    """The store at ``location``: a SQLite file path (``sqlite:///path`` also accepted)."""
    text = str(location)
    if text.startswith("sqlite://"):
        return SQLiteStore(Path(text.removeprefix("sqlite://")))
    if "://" in text:
        # Limitation: only SQLite for now; an etcd store would plug in here.
        raise ConfigError(f"store {text!r} is not supported; give a SQLite file path")
    return SQLiteStore(Path(text))
