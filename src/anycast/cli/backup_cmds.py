"""``anycast backup create|verify|restore``: the control-plane store and the registry."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from anycast.cli.cluster import HomeOption, cluster_config, existing_cluster
from anycast.core.errors import AnycastError, Conflict

out = Console()
err = Console(stderr=True)

backup_app = typer.Typer(
    name="backup",
    help="Back up and restore a cluster: control-plane state, registry blobs and tags.",
    no_args_is_help=True,
)


def _fail(exc: AnycastError) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc.message}", soft_wrap=True)
    return typer.Exit(1)


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None]]:
    """A Rich progress bar fed by the backup module's (what, done, total) callbacks."""
    bar = Progress(
        TextColumn("{task.description:<13}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    tasks: dict[str, TaskID] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done)

    with bar:
        yield update


def _default_out() -> Path:
    return Path(f"anycast-backup-{time.strftime('%Y%m%d-%H%M%S')}.tar")


@backup_app.command("create")
def create(
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Backup file (default: ./anycast-backup-<time>.tar)."),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Write a backup of the cluster home; the cluster may keep running meanwhile."""
    from anycast.control.backup import create_backup

    target = out_file or _default_out()
    config = existing_cluster(home)
    try:
        with _progress() as progress:
            info = create_backup(config, target, progress=progress)
    except AnycastError as exc:
        raise _fail(exc) from exc
    counts = info.counts
    out.print(
        f"backup [bold]{info.path}[/bold]: revision {info.revision}, "
        f"{counts.get('deployments', 0)} deployment(s), {counts.get('artifacts', 0)} "
        f"artifact(s), {counts.get('blobs', 0)} blob(s), {decimal(info.size)}",
        soft_wrap=True,
    )


@backup_app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="A backup made by `anycast backup create`.")],
) -> None:
    """Check every member of a backup against its manifest, without restoring it."""
    from anycast.control.backup import verify_backup

    try:
        with _progress() as progress:
            info = verify_backup(file, progress=progress)
    except AnycastError as exc:
        raise _fail(exc) from exc
    out.print(
        f"backup {file} is intact: {len(info.members)} member(s), revision {info.revision}",
        soft_wrap=True,
    )


@backup_app.command("restore")
def restore(
    file: Annotated[Path, typer.Argument(help="A backup made by `anycast backup create`.")],
    force: Annotated[
        bool,
        typer.Option(help="Replace a store that already holds deployments (kept beside it)."),
    ] = False,
    home: HomeOption = None,
) -> None:
    """Restore a backup into the cluster home; its control plane must be stopped.

    Every checksum is verified before anything is written. Start the cluster afterwards
    with `anycast up`: the region agents pull the artifacts from the restored registry.
    """
    from anycast.control.backup import restore_backup
    from anycast.local import LocalCluster

    try:
        config = cluster_config(home)
        pid = LocalCluster(config).pid("control")
        if pid is not None:
            raise Conflict(
                f"the control plane of {config.home} is running (pid {pid}); "
                "stop the cluster with `anycast down`, then restore",
                code="control_plane_running",
            )
        with _progress() as progress:
            result = restore_backup(file, config, force=force, progress=progress)
    except AnycastError as exc:
        raise _fail(exc) from exc
    counts = result.backup.counts
    out.print(
        f"restored {file} into {config.home}: {counts.get('deployments', 0)} deployment(s), "
        f"{counts.get('artifacts', 0)} artifact(s), {result.blobs_added} new blob(s), "
        f"store revision {result.revision}",
        soft_wrap=True,
    )
    if result.replaced_store:
        out.print(f"the previous store is kept as {result.replaced_store}", soft_wrap=True)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    out.print("start the cluster with `anycast up`")


def register(app: typer.Typer) -> None:
    """Add ``anycast backup ...`` to ``app``."""
    app.add_typer(backup_app)
