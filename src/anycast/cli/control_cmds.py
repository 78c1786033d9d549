"""``anycast control``, ``anycast build`` and ``anycast push``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from anycast.core.config import ClusterConfig, load_config
from anycast.core.errors import AnycastError, ConfigError, InvalidInput

console = Console(stderr=True)
out = Console()


def _fail(exc: AnycastError) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(exc.message)}")  # messages may hold [...]
    return typer.Exit(code=1)


def _cluster_config(config: Path | None, home: Path | None) -> ClusterConfig:
    if config is None:
        return load_config(home)
    import yaml
    from pydantic import ValidationError

    try:
        data = yaml.safe_load(config.read_text()) or {}
        data.setdefault("home", str(home or config.parent))
        return ClusterConfig.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{config} is not a readable cluster configuration: {exc}") from exc


def control(
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Port to listen on (default: from config, 7070)"),
    ] = None,
    db: Annotated[
        Path | None, typer.Option(help="SQLite store (default: HOME/control/state.db)")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Cluster config file (cluster.yaml)")] = None,
    home: Annotated[
        Path | None, typer.Option(help="Cluster home folder (default: .anycast)")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default: 127.0.0.1)")
    ] = None,
) -> None:
    """Run the control plane: desired and observed state over HTTP."""
    from anycast.control.api import build_app
    from anycast.control.store import SQLiteStore
    from anycast.core.http import serve
    from anycast.core.logs import setup_logging

    setup_logging("control")
    try:
        cfg = _cluster_config(config, home)
        store = SQLiteStore(db or cfg.control_db)
        app = build_app(store, cfg.regions)
    except AnycastError as exc:
        raise _fail(exc) from exc
    listen_host, listen_port = host or cfg.host, port if port is not None else cfg.control_port
    console.print(f"control plane on http://{listen_host}:{listen_port} (store {store.path})")
    try:
        serve(app, listen_host, listen_port, graceful_seconds=1)
    finally:
        store.close()


def _parse_files(items: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--file must be NAME=PATH, got {item!r}")
        files[name] = Path(path)
    return files


def build(
    service_ref: Annotated[str, typer.Argument(help="path/to/service.py:ClassName")],
    name: Annotated[str, typer.Option(help="Artifact name, e.g. digits")],
    version: Annotated[str, typer.Option(help="Artifact version, e.g. 1")],
    file: Annotated[
        list[str] | None, typer.Option(help="Extra file as NAME=PATH (repeatable)")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder")] = Path("dist"),
    model_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="Model backend: torch (files as given) or onnx (also export the service's "
            "export_model() to model.onnx; needs the onnx extra: pip install 'anycast\\[onnx]')",
        ),
    ] = "torch",
) -> None:
    """Pack a service and its files into an artifact tar; print its id and path."""
    from anycast.registry.build import build_artifact

    # The error message says what is wrong with the service; keep its traceback off the screen.
    logging.getLogger("anycast").addHandler(logging.NullHandler())
    try:
        artifact_id, path = build_artifact(
            service_ref,
            name=name,
            version=version,
            files=_parse_files(file or []),
            out_dir=out_dir,
            model_format=model_format,
            require_service=True,
        )
    except AnycastError as exc:
        raise _fail(exc) from exc
    out.print(f"{artifact_id} {path}", soft_wrap=True)


def push(
    tar: Annotated[Path, typer.Argument(help="Artifact tar made by `anycast build`")],
    registry: Annotated[
        Path | None, typer.Option(help="Registry folder (default: HOME/registry)")
    ] = None,
    control: Annotated[
        str | None, typer.Option(help="Control plane URL (default: from config)")
    ] = None,
    home: Annotated[
        Path | None, typer.Option(help="Cluster home folder (default: .anycast)")
    ] = None,
) -> None:
    """Store an artifact in the registry and register it with the control plane."""
    from anycast.cli.cluster import missing_cluster_message
    from anycast.control.client import ControlClient
    from anycast.registry import LocalStorage, Registry

    if home is not None and control is None and not (home / "cluster.yaml").is_file():
        console.print(f"[red]error:[/red] {escape(missing_cluster_message(home))}")
        raise typer.Exit(code=2)  # its control plane would be guessed: another cluster's
    try:
        if tar.is_dir():
            raise InvalidInput(f"{tar} is a folder; give the .tar file `anycast build` printed")
        cfg = load_config(home)
        pushed = Registry(LocalStorage(registry or cfg.registry_dir)).push(tar)
    except AnycastError as exc:
        raise _fail(exc) from exc
    out.print(f"{pushed['id']} {pushed['name']}:{pushed['version']}", soft_wrap=True)

    url = control or cfg.control_url
    with ControlClient(url) as client:
        if not client.health():
            console.print(
                f"[red]error:[/red] the artifact is stored in the registry, but the control plane "
                f"at {url} is not reachable, so it is not registered and cannot be deployed yet; "
                "start the cluster (`anycast up`) and run this push again to register it"
            )
            raise typer.Exit(code=1)
        try:
            client.register_artifact(
                pushed["id"], pushed["name"], pushed["version"], pushed["manifest"]
            )
        except AnycastError as exc:
            raise _fail(exc) from exc
    console.print(f"registered with the control plane at {url}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command()(control)
    app.command()(build)
    app.command()(push)
