"""Replica commands: ``anycast serve`` (from source) and ``anycast replica`` (from an artifact)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

err_console = Console(stderr=True)

REF_HELP = "Service to run, as path/to/service.py:ClassName."


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("serve")(serve)
    app.command("replica", hidden=True)(replica)


def serve(
    ref: Annotated[str, typer.Argument(help=REF_HELP, metavar="REF")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 9000,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    file: Annotated[
        list[str] | None,
        typer.Option(
            "--file",
            metavar="NAME=PATH",
            help="A file the service opens with self.file(NAME); repeatable.",
        ),
    ] = None,
    files_dir: Annotated[
        Path | None,
        typer.Option(help="Folder of the service's files (default: the service file's folder)."),
    ] = None,
    replica_id: Annotated[str, typer.Option(help="Name shown in X-Anycast-Replica.")] = "dev",
) -> None:
    """Run one replica of a service from source, for development."""
    from anycast.core.errors import AnycastError
    from anycast.core.http import port_in_use
    from anycast.core.logs import setup_logging
    from anycast.replica import EXIT_SETUP_FAILED, EXIT_USAGE, serve_service, set_torch_threads
    from anycast.sdk import ServiceImportError, load_service, split_ref

    setup_logging("replica")
    try:
        files = _parse_files(file or [])
        folder = files_dir or Path(split_ref(ref)[0]).resolve().parent
        if not folder.is_dir():
            raise typer.BadParameter(f"--files-dir {folder} is not a folder")
        set_torch_threads()
    except AnycastError as exc:
        _fail(exc.message, EXIT_USAGE)
    if port_in_use(port, host):
        _fail(
            f"port {port} on {host} is already in use by another process; stop it or pass --port",
            EXIT_USAGE,
        )
    try:
        service_cls = load_service(ref)
    except ServiceImportError as exc:
        _fail(exc.message, EXIT_SETUP_FAILED)
    except AnycastError as exc:
        _fail(exc.message, EXIT_USAGE)

    try:
        code = serve_service(
            service_cls, files_dir=folder, files=files, port=port, host=host, replica_id=replica_id
        )
    except AnycastError as exc:
        _fail(exc.message, EXIT_USAGE)
    raise typer.Exit(code)


def replica(
    artifact: Annotated[Path, typer.Option(help="Unpacked artifact folder.")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")],
    replica_id: Annotated[str, typer.Option(help="This replica's id.")],
    artifact_id: Annotated[
        str | None,
        typer.Option(help="Expected artifact id (default: the folder name, if 64 hex digits)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Verify an unpacked artifact, then serve it (what region agents run)."""
    from anycast.core.logs import setup_logging
    from anycast.replica import run_artifact

    setup_logging("replica")
    code = run_artifact(
        artifact, port=port, replica_id=replica_id, artifact_id=artifact_id, host=host
    )
    raise typer.Exit(code)


def _parse_files(entries: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for entry in entries:
        name, sep, path_text = entry.partition("=")
        if not sep or not name or not path_text:
            raise typer.BadParameter(f"--file must be NAME=PATH, got {entry!r}")
        path = Path(path_text)
        if not path.is_file():
            raise typer.BadParameter(f"--file {name}: {path} is not an existing file")
        files[name] = path.resolve()
    return files


def _fail(message: str, code: int) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)
