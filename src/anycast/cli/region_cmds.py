"""``anycast region`` (one region's agent) and ``anycast gateway`` (the global endpoint)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from anycast.core.errors import AnycastError

err = Console(stderr=True)

HOME_HELP = "Cluster home folder (default: $ANYCAST_HOME or ./.anycast)."


def region(
    name: str = typer.Option(..., "--name", help="Region to run, as named in cluster.yaml."),
    home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
    control: str | None = typer.Option(None, "--control", help="Control plane URL."),
    port: int | None = typer.Option(None, "--port", help="Port of the agent's own API."),
) -> None:
    """Run the agent of one region: start and stop its replicas as the control plane asks."""
    from anycast.core.config import load_config
    from anycast.core.http import LOOPBACK, serve
    from anycast.core.logs import setup_logging
    from anycast.region.agent import RegionAgent, create_agent_app

    setup_logging(f"region-{name}")
    try:
        config = load_config(home)
        config.region(name)
        port = port or config.agent_port(name)
        agent = RegionAgent(
            config, name, control or config.control_url, f"http://{LOOPBACK}:{port}"
        )
    except AnycastError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    serve(create_agent_app(agent), port=port)


def gateway(
    home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
    port: int | None = typer.Option(None, "--port", help="Port to listen on (default 8080)."),
    control: str | None = typer.Option(None, "--control", help="Control plane URL."),
    region_name: str | None = typer.Option(
        None, "--region", help="The gateway's own region: callers without X-Anycast-Region."
    ),
    simulate_latency: bool | None = typer.Option(
        None,
        "--simulate-latency/--no-simulate-latency",
        help="Sleep the estimated round trip on cross-region calls (default from cluster.yaml).",
    ),
    try_timeout: float = typer.Option(
        20.0, "--try-timeout", help="Seconds one replica gets to start answering, per try."
    ),
    deadline: float = typer.Option(
        60.0,
        "--deadline",
        help="Seconds a call may take, retries included; callers may ask for less with "
        "X-Anycast-Timeout-Ms.",
    ),
    eject_after: int = typer.Option(
        3, "--eject-after", help="Consecutive errors (5xx, timeouts) that eject a replica."
    ),
    eject_seconds: float = typer.Option(
        2.0,
        "--eject-seconds",
        help="First cool-down of an ejected replica; doubled for repeat offenders.",
    ),
    grace: float = typer.Option(
        10.0, "--grace", help="Seconds calls in flight get to finish after SIGTERM."
    ),
    cache_entries: int = typer.Option(
        1024, "--cache-entries", help="Responses of deterministic handlers kept; 0 disables."
    ),
    cache_mb: float = typer.Option(64.0, "--cache-mb", help="Bytes of cached bodies, in MiB."),
    hold_seconds: float = typer.Option(
        30.0,
        "--hold-seconds",
        help="Seconds a call may wait while a region scaled to zero wakes up; 0: no holding.",
    ),
    data_plane: str | None = typer.Option(
        None,
        "--data-plane",
        help="python (default from cluster.yaml) or haproxy: HAProxy carries the calls it can "
        "route alone, this process steers it and serves the rest (needs Debian's haproxy).",
    ),
) -> None:
    """Run the global gateway: nearest healthy region, least-loaded replica, retries."""
    from anycast.core.config import load_config
    from anycast.core.logs import setup_logging
    from anycast.gateway import Gateway, serve_gateway
    from anycast.gateway.haproxy import check_data_plane, haproxy_binary

    setup_logging("gateway")
    try:
        config = load_config(home)
        gw = Gateway(
            config,
            region=region_name,
            control_url=control,
            simulate_latency=simulate_latency,
            try_timeout=try_timeout,
            deadline=deadline,
            eject_after=eject_after,
            eject_seconds=eject_seconds,
            cache_entries=cache_entries,
            cache_bytes=int(cache_mb * 1024 * 1024),
            hold_seconds=hold_seconds,
        )
        plane = check_data_plane(data_plane or config.gateway_data_plane)
        if plane == "haproxy":
            haproxy_binary()
    except AnycastError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    serve_gateway(gw, port=port or config.gateway_port, grace=grace, data_plane=plane)


def register(app: typer.Typer) -> None:
    """Add ``region`` and ``gateway`` to ``app``."""
    app.command("region")(region)
    app.command("gateway")(gateway)
