"""Backups of a cluster home: what they hold, what restore brings back, what it refuses."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from anycast.control.backup import (
    FORMAT,
    MANIFEST,
    STORE_MEMBER,
    create_backup,
    restore_backup,
    verify_backup,
)
from anycast.control.plane import ControlPlane
from anycast.control.store import SQLiteStore
from anycast.core.config import ClusterConfig
from anycast.core.errors import Conflict, IntegrityError, InvalidInput
from anycast.registry import LocalStorage, Registry, build_artifact


def _home(root: Path) -> ClusterConfig:
    config = ClusterConfig(home=root)
    config.save()
    return config


def _push(config: ClusterConfig, work: Path, version: str = "1", greeting: str = "hi") -> str:
    """Build an artifact, push it to the home's registry and register it, as `anycast push`."""
    service = work / "service.py"
    service.write_text(f"class Echo:\n    greeting = {greeting!r}\n")
    _, tar = build_artifact(f"{service}:Echo", name="echo", version=version, out_dir=work)
    pushed = Registry(LocalStorage(config.registry_dir)).push(tar)
    store = SQLiteStore(config.control_db)
    try:
        plane = ControlPlane(store)
        plane.seed_regions(config.regions)
        plane.register_artifact(pushed["id"], "echo", version, pushed["manifest"])
    finally:
        store.close()
    return str(pushed["id"])


def _deploy(config: ClusterConfig, name: str, artifact: str, replicas: dict[str, int]) -> dict:
    store = SQLiteStore(config.control_db)
    try:
        return ControlPlane(store).put_deployment(name, artifact, replicas)
    finally:
        store.close()


def _report_replica(config: ClusterConfig, artifact: str) -> None:
    store = SQLiteStore(config.control_db)
    row = {
        "id": "echo-us-east-0",
        "deployment": "echo",
        "artifact": artifact,
        "region": "us-east",
        "endpoint": "http://127.0.0.1:9",
        "state": "ready",
    }
    try:
        ControlPlane(store).report_replicas("us-east", [row])
    finally:
        store.close()


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the SHA-256 of its bytes."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def source(tmp_path: Path) -> tuple[ClusterConfig, str]:
    """A cluster home with one artifact, one deployment and one observed replica."""
    config = _home(tmp_path / "source")
    artifact = _push(config, tmp_path)
    _deploy(config, "echo", artifact, {"us-east": 2, "eu-west": 1})
    _report_replica(config, artifact)
    return config, artifact


def test_backup_holds_store_registry_and_a_checksum_of_every_member(
    source: tuple[ClusterConfig, str], tmp_path: Path
) -> None:
    config, artifact = source

    info = create_backup(config, tmp_path / "b.tar")

    with tarfile.open(tmp_path / "b.tar") as tar:
        names = tar.getnames()
    assert names[0] == MANIFEST
    assert set(names[1:]) == set(info.members)
    assert STORE_MEMBER in names
    assert f"registry/blobs/{artifact}.tar" in names
    assert "registry/tags/echo/1" in names
    assert info.counts["deployments"] == 1 and info.counts["artifacts"] == 1
    assert verify_backup(tmp_path / "b.tar").members == info.members


def test_restore_into_a_fresh_home_brings_back_deployments_artifacts_and_blobs(
    source: tuple[ClusterConfig, str], tmp_path: Path
) -> None:
    config, artifact = source
    create_backup(config, tmp_path / "b.tar")
    before = SQLiteStore(config.control_db)
    deployment = ControlPlane(before).deployment("echo")
    before.close()
    fresh = ClusterConfig(home=tmp_path / "fresh")

    result = restore_backup(tmp_path / "b.tar", fresh)

    store = SQLiteStore(fresh.control_db)
    plane = ControlPlane(store)
    assert plane.deployment("echo") == deployment
    assert [a["id"] for a in plane.artifacts()] == [artifact]
    assert plane.replicas() == []  # observed state is reported again by the new agents
    assert store.revision() == result.revision > result.backup.revision
    store.close()
    registry = Registry(LocalStorage(fresh.registry_dir))
    assert registry.resolve("echo:1") == artifact
    assert registry.pull(artifact, tmp_path / "pulled").is_dir()
    assert (fresh.home / "cluster.yaml").is_file()
    assert result.blobs_added == 1 and result.tags_added == 1


def test_backup_is_one_consistent_revision_while_writes_go_on(tmp_path: Path) -> None:
    config = _home(tmp_path / "busy")
    writer = SQLiteStore(config.control_db)
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            writer.put("deployments", f"d{i:05d}", {"n": i})
            i += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        time.sleep(0.3)
        info = create_backup(config, tmp_path / "b.tar")
    finally:
        stop.set()
        thread.join()
        writer.close()
    restored = ClusterConfig(home=tmp_path / "restored")
    restore_backup(tmp_path / "b.tar", restored)

    store = SQLiteStore(restored.control_db)
    records = store.list("deployments")
    store.close()
    assert records, "the writer wrote nothing before the backup"
    # Keys were written in order, one revision each: a consistent copy holds a prefix of
    # them, every one at or below the backup's revision.
    assert [r.value["n"] for r in records] == list(range(len(records)))
    assert max(r.revision for r in records) <= info.revision


def _flip_byte_in(backup: Path, member: str) -> None:
    with tarfile.open(backup) as tar:
        info = tar.getmember(member)
    data = bytearray(backup.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0xFF
    backup.write_bytes(bytes(data))


@pytest.mark.parametrize("member", [STORE_MEMBER, "blob"])
def test_a_corrupt_backup_is_refused_and_nothing_changes(
    source: tuple[ClusterConfig, str], tmp_path: Path, member: str
) -> None:
    config, artifact = source
    create_backup(config, tmp_path / "b.tar")
    _flip_byte_in(
        tmp_path / "b.tar", f"registry/blobs/{artifact}.tar" if member == "blob" else member
    )
    target = _home(tmp_path / "target")
    before = _tree(target.home)

    with pytest.raises(IntegrityError, match=r"fails its SHA-256 check.*nothing was restored"):
        restore_backup(tmp_path / "b.tar", target)
    with pytest.raises(IntegrityError, match="corrupt"):
        verify_backup(tmp_path / "b.tar")
    assert _tree(target.home) == before


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_a_truncated_backup_is_refused_and_nothing_changes(
    source: tuple[ClusterConfig, str], tmp_path: Path, keep: float
) -> None:
    config, _ = source
    create_backup(config, tmp_path / "b.tar")
    with tarfile.open(tmp_path / "b.tar") as tar:
        last = tar.getmembers()[-1]
    data_end = last.offset_data + last.size  # the rest is the tar's zero padding
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: int(data_end * keep)])
    target = tmp_path / "never-created"

    with pytest.raises(IntegrityError, match="truncated"):
        restore_backup(tmp_path / "b.tar", ClusterConfig(home=target))
    assert not target.exists()


def test_something_that_is_not_a_backup_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as tar:
        tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    home = ClusterConfig(home=tmp_path / "home")

    with pytest.raises(IntegrityError, match="not an Anycast backup"):
        restore_backup(tmp_path / "notes.txt", home)
    with pytest.raises(IntegrityError, match=r"first member must be backup\.json"):
        restore_backup(other, home)
    with pytest.raises(InvalidInput, match="does not exist"):
        restore_backup(tmp_path / "missing.tar", home)


def test_restore_refuses_while_a_control_plane_has_the_store_open(
    source: tuple[ClusterConfig, str], tmp_path: Path
) -> None:
    config, _ = source
    create_backup(config, tmp_path / "b.tar")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from anycast.control.store import SQLiteStore; "
            "s = SQLiteStore(sys.argv[1]); print('open', flush=True); time.sleep(60)",
            str(config.control_db),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"open"
        before = _tree(config.home)

        with pytest.raises(Conflict, match=f"is running \\(pid {holder.pid} .*anycast down"):
            restore_backup(tmp_path / "b.tar", config, force=True)
        assert _tree(config.home) == before
    finally:
        holder.kill()
        holder.wait()


def test_restore_over_real_state_needs_force_and_keeps_the_old_store(
    source: tuple[ClusterConfig, str], tmp_path: Path
) -> None:
    config, artifact = source
    create_backup(config, tmp_path / "b.tar")
    _deploy(config, "later", artifact, {"us-east": 1})
    old = SQLiteStore(config.control_db)
    old_revision = old.revision()
    old.close()

    with pytest.raises(Conflict, match="pass --force"):
        restore_backup(tmp_path / "b.tar", config)
    result = restore_backup(tmp_path / "b.tar", config, force=True)

    store = SQLiteStore(config.control_db)
    assert [d.key for d in store.list("deployments")] == ["echo"]
    # Above every revision the old cluster's watchers saw, so their long-polls wake up.
    assert store.revision() == result.revision > old_revision
    store.close()
    assert result.replaced_store is not None
    kept = SQLiteStore(result.replaced_store)
    assert [d.key for d in kept.list("deployments")] == ["echo", "later"]
    kept.close()


def test_restore_refuses_a_tag_that_points_elsewhere_here(
    source: tuple[ClusterConfig, str], tmp_path: Path
) -> None:
    config, _ = source
    create_backup(config, tmp_path / "b.tar")
    target = _home(tmp_path / "target")
    (tmp_path / "other").mkdir()
    _push(target, tmp_path / "other", version="1", greeting="hello")  # echo:1, another id
    before = _tree(target.home)

    with pytest.raises(Conflict, match="immutable"):
        restore_backup(tmp_path / "b.tar", target, force=True)
    assert _tree(target.home) == before


def test_backup_refuses_to_overwrite_a_file_or_back_up_nothing(
    source: tuple[ClusterConfig, str], tmp_path: Path
) -> None:
    config, _ = source
    (tmp_path / "taken.tar").write_text("mine")

    with pytest.raises(InvalidInput, match="already exists"):
        create_backup(config, tmp_path / "taken.tar")
    assert (tmp_path / "taken.tar").read_text() == "mine"
    with pytest.raises(Exception, match="no control-plane store"):
        create_backup(ClusterConfig(home=tmp_path / "empty"), tmp_path / "new.tar")


def _handmade_backup(path: Path, members: dict[str, bytes]) -> None:
    """A backup whose manifest matches its members, whatever they hold."""
    listed = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in members.items()
    }
    manifest = json.dumps({"format": FORMAT, "revision": 1, "members": listed}).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in {MANIFEST: manifest, **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_backup_whose_store_is_not_sqlite_is_refused_and_nothing_changes(
    tmp_path: Path,
) -> None:
    _handmade_backup(tmp_path / "b.tar", {STORE_MEMBER: b"not a database" * 100})
    target = _home(tmp_path / "target")
    before = _tree(target.home)

    with pytest.raises(IntegrityError, match="not a readable control-plane store"):
        restore_backup(tmp_path / "b.tar", target)
    assert _tree(target.home) == before


def test_a_backup_member_outside_the_known_layout_is_refused(tmp_path: Path) -> None:
    _handmade_backup(tmp_path / "b.tar", {STORE_MEMBER: b"x", "../../etc/passwd": b"x"})

    with pytest.raises(IntegrityError, match=re.escape("unexpected member '../../etc/passwd'")):
        verify_backup(tmp_path / "b.tar")


def test_restore_warns_about_regions_this_cluster_does_not_run(
    source: tuple[ClusterConfig, str], tmp_path: Path
) -> None:
    config, _ = source
    create_backup(config, tmp_path / "b.tar")
    only_us = ClusterConfig(home=tmp_path / "small", regions=config.regions[:1])
    only_us.save()

    result = restore_backup(tmp_path / "b.tar", only_us)

    assert result.warnings == [
        "deployments want replicas in eu-west, which this cluster's cluster.yaml does not "
        "run; add those regions to it or redeploy"
    ]
