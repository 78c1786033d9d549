"""One suite for every control-plane store backend (SQLite now; etcd will join the list)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from anycast.control.store import SQLiteStore, Store
from anycast.core.errors import Conflict, NotFound

StoreFactory = Callable[[], Store]


def _sqlite(tmp_path: Path) -> StoreFactory:
    return lambda: SQLiteStore(tmp_path / "state.db")


BACKENDS = {"sqlite": _sqlite}


@pytest.fixture(params=sorted(BACKENDS))
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens the backend at the same place each call, so a test can reopen it."""
    opened: list[Store] = []

    def factory() -> Store:
        store = BACKENDS[request.param](tmp_path)()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: StoreFactory) -> Store:
    return open_store()


def test_put_then_get_returns_value_and_revision(store: Store) -> None:
    record = store.put("deployments", "digits", {"replicas": {"us-east": 2}})

    got = store.get("deployments", "digits")
    assert got == record
    assert got is not None and got.value == {"replicas": {"us-east": 2}}
    assert got.revision == store.revision() == got.created_revision


def test_missing_object_reads_as_none(store: Store) -> None:
    assert store.get("deployments", "nope") is None


def test_revisions_increase_with_every_write_and_delete(store: Store) -> None:
    seen = [store.revision()]
    seen.append(store.put("a", "x", {"n": 1}).revision)
    seen.append(store.put("b", "y", {"n": 2}).revision)
    seen.append(store.put("a", "x", {"n": 3}).revision)
    store.delete("b", "y")
    seen.append(store.revision())

    assert seen == sorted(set(seen))


def test_update_keeps_created_revision(store: Store) -> None:
    first = store.put("a", "x", {"n": 1})
    second = store.put("a", "x", {"n": 2})

    assert second.created_revision == first.revision
    assert second.revision > first.revision


def test_list_filters_by_kind_and_prefix_in_key_order(store: Store) -> None:
    for key in ("b-2", "a-1", "b-1"):
        store.put("deployments", key, {"k": key})
    store.put("regions", "b-3", {})

    assert [r.key for r in store.list("deployments")] == ["a-1", "b-1", "b-2"]
    assert [r.key for r in store.list("deployments", prefix="b-")] == ["b-1", "b-2"]
    assert store.list("nothing") == []


def test_cas_zero_creates_only_if_absent(store: Store) -> None:
    created = store.put("a", "x", {"n": 1}, expected_revision=0)

    with pytest.raises(Conflict) as caught:
        store.put("a", "x", {"n": 2}, expected_revision=0)
    assert caught.value.details["revision"] == created.revision
    assert store.get("a", "x").value == {"n": 1}  # type: ignore[union-attr]


def test_cas_at_current_revision_wins_and_stale_revision_loses(store: Store) -> None:
    first = store.put("a", "x", {"n": 1})
    second = store.put("a", "x", {"n": 2}, expected_revision=first.revision)

    with pytest.raises(Conflict) as caught:
        store.put("a", "x", {"n": 3}, expected_revision=first.revision)
    assert caught.value.details["revision"] == second.revision
    assert store.get("a", "x").value == {"n": 2}  # type: ignore[union-attr]


def test_cas_on_missing_object_reports_revision_zero(store: Store) -> None:
    with pytest.raises(Conflict) as caught:
        store.put("a", "x", {}, expected_revision=5)
    assert caught.value.details["revision"] == 0


def test_delete_returns_old_value_and_respects_cas(store: Store) -> None:
    record = store.put("a", "x", {"n": 1})

    with pytest.raises(Conflict):
        store.delete("a", "x", expected_revision=record.revision + 100)
    deleted = store.delete("a", "x", expected_revision=record.revision)

    assert deleted.value == {"n": 1}
    assert store.get("a", "x") is None
    with pytest.raises(NotFound):
        store.delete("a", "x")


def test_data_survives_reopen(open_store: StoreFactory) -> None:
    first = open_store()
    record = first.put("deployments", "digits", {"replicas": {"eu-west": 1}})
    first.close()

    again = open_store()
    assert again.get("deployments", "digits") == record
    assert again.revision() == record.revision
    assert again.put("a", "b", {}).revision == record.revision + 1


def test_wait_returns_at_once_when_already_newer(store: Store) -> None:
    store.put("a", "x", {})
    started = time.monotonic()

    assert store.wait(0, timeout=5) == store.revision()
    assert time.monotonic() - started < 1


def test_wait_times_out_with_current_revision(store: Store) -> None:
    now = store.revision()
    started = time.monotonic()

    assert store.wait(now, timeout=0.3) == now
    assert 0.25 <= time.monotonic() - started < 2


def test_wait_wakes_when_another_thread_writes(store: Store) -> None:
    now = store.revision()
    timer = threading.Timer(0.2, lambda: store.put("a", "x", {}))
    timer.start()
    started = time.monotonic()

    woke_at = store.wait(now, timeout=10)

    assert woke_at > now
    assert time.monotonic() - started < 2
    timer.join()


def test_wait_sees_writes_from_another_connection(open_store: StoreFactory) -> None:
    watcher, writer = open_store(), open_store()
    now = watcher.revision()
    timer = threading.Timer(0.2, lambda: writer.put("a", "x", {}))
    timer.start()

    assert watcher.wait(now, timeout=10) > now
    timer.join()


def test_concurrent_cas_writers_have_exactly_one_winner(store: Store) -> None:
    base = store.put("deployments", "digits", {"owner": "nobody"})
    barrier = threading.Barrier(8)
    winners: list[int] = []
    losers: list[int] = []

    def contend(i: int) -> None:
        barrier.wait()
        try:
            store.put("deployments", "digits", {"owner": i}, expected_revision=base.revision)
            winners.append(i)
        except Conflict:
            losers.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(winners) == 1 and len(losers) == 7
    assert store.get("deployments", "digits").value == {"owner": winners[0]}  # type: ignore[union-attr]


def test_concurrent_writers_get_unique_revisions(store: Store) -> None:
    revisions: list[int] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        for j in range(10):
            record = store.put("a", f"{i}-{j}", {})
            with lock:
                revisions.append(record.revision)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(set(revisions)) == 40
    assert store.revision() == max(revisions)


_WRITER = """
import sys, threading
from anycast.control.store import SQLiteStore

store = SQLiteStore(sys.argv[1])
lock = threading.Lock()

def write(t):
    for i in range(100000):
        record = store.put("deployments", f"w{t}-{i}", {"n": i})
        with lock:
            print(record.key, record.revision, flush=True)

for t in range(4):
    threading.Thread(target=write, args=(t,)).start()
"""


def test_sqlite_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE, text=True
    )
    acknowledged: dict[str, int] = {}
    try:
        assert writer.stdout is not None
        while len(acknowledged) < 300:
            line = writer.stdout.readline()
            assert line, "the writer exited early"
            key, revision = line.split()
            acknowledged[key] = int(revision)
    finally:
        writer.kill()  # SIGKILL, in the middle of the writers' commits
        writer.wait()

    store = SQLiteStore(db)
    try:
        survived = {r.key: r.revision for r in store.list("deployments")}
        assert {k: survived.get(k) for k in acknowledged} == acknowledged
        assert store.revision() >= max(acknowledged.values())
        assert store.put("a", "after", {}).revision > max(survived.values())
    finally:
        store.close()


def test_sqlite_snapshot_is_a_standalone_copy_and_the_store_goes_on(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    written = [store.put("deployments", f"d{i}", {"n": i}) for i in range(5)]

    revision = store.snapshot(tmp_path / "copy.db")
    store.put("deployments", "later", {})

    assert revision == written[-1].revision
    assert not (tmp_path / "copy.db-wal").exists()
    copy = SQLiteStore(tmp_path / "copy.db")
    try:
        assert copy.list("deployments") == written
        assert copy.revision() == revision
    finally:
        copy.close()
        store.close()


def test_sqlite_advance_revision_only_moves_forward(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    try:
        store.put("a", "x", {})
        assert store.advance_revision(50) == 50
        assert store.advance_revision(10) == 50
        assert store.put("a", "y", {}).revision == 51
    finally:
        store.close()
