"""Commands for a whole cluster: up, down, status, deploy, predict, demo."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from anycast.core.config import ClusterConfig, default_home, load_config
from anycast.core.errors import AnycastError, InvalidInput, Unavailable

console = Console()
err_console = Console(stderr=True)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="Cluster home folder [env ANYCAST_HOME, else .anycast]."),
]


def cluster_config(
    home: Path | None,
    control_port: int | None = None,
    gateway_port: int | None = None,
    agent_port_base: int | None = None,
) -> ClusterConfig:
    """The cluster's configuration, with any ports given on the command line applied."""
    config = load_config(home or default_home())
    updates: dict[str, Any] = {}
    if control_port is not None:
        updates["control_port"] = control_port
    if gateway_port is not None:
        updates["gateway_port"] = gateway_port
    if agent_port_base is not None:
        updates["agent_port_base"] = agent_port_base
    return config.model_copy(update=updates)


def fail(exc: AnycastError | str, code: int = 1) -> typer.Exit:
    message = exc.message if isinstance(exc, AnycastError) else exc
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def parse_replicas(replicas: int, per_region: list[str], regions: list[str]) -> dict[str, int]:
    """``--replicas 2`` everywhere, overridden by ``--region eu-west=3`` entries."""
    counts = dict.fromkeys(regions, replicas)
    for item in per_region:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise InvalidInput(f"--region takes REGION=COUNT, such as eu-west=2, got {item!r}")
        counts[name.strip()] = int(value)
    return counts


def wait_ready(
    control_url: str, deployment: str, want: dict[str, int], timeout: float = 120.0
) -> list[dict]:
    """Block until every region has ``want[region]`` ready replicas of ``deployment``."""
    from anycast.control.client import ControlClient

    control = ControlClient(control_url)
    deadline = time.monotonic() + timeout
    while True:
        replicas = control.replicas(deployment=deployment)
        ready: dict[str, int] = {}
        for replica in replicas:
            if replica.get("state") == "ready":
                ready[replica["region"]] = ready.get(replica["region"], 0) + 1
        if all(ready.get(region, 0) >= n for region, n in want.items()):
            return replicas
        if time.monotonic() > deadline:
            failing = [r for r in replicas if r.get("last_error")]
            reason = f"; last error: {failing[0]['last_error']}" if failing else ""
            raise Unavailable(
                f"deployment {deployment} has ready replicas {ready or 'none'}, "
                f"wanted {want} after {timeout:.0f} s{reason}"
            )
        time.sleep(0.25)


def up(
    home: HomeOption = None,
    control_port: Annotated[int | None, typer.Option(help="Control-plane port.")] = None,
    gateway_port: Annotated[int | None, typer.Option(help="Gateway port.")] = None,
    agent_port_base: Annotated[int | None, typer.Option(help="First region agent port.")] = None,
) -> None:
    """Start the control plane, one agent per region and the gateway in the background."""
    from anycast.local import LocalCluster

    cluster = LocalCluster(cluster_config(home, control_port, gateway_port, agent_port_base))
    try:
        with console.status("starting the local cluster"):
            processes = cluster.up()
    except AnycastError as exc:
        raise fail(exc) from exc
    for proc in processes:
        console.print(f"  [green]up[/green] {proc.role:<22} pid {proc.pid}  log {proc.log}")
    console.print(f"gateway: {cluster.config.gateway_url}   control: {cluster.config.control_url}")


def down(home: HomeOption = None) -> None:
    """Stop exactly what `anycast up` started, and the replicas its agents run."""
    from anycast.local import LocalCluster

    cluster = LocalCluster(cluster_config(home))
    stopped = cluster.down()
    if not stopped:
        console.print("nothing was running")
    for name in stopped:
        console.print(f"  [yellow]stopped[/yellow] {name}")


def status(
    home: HomeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show regions, deployments and replicas as the control plane sees them."""
    from anycast.control.client import ControlClient

    config = cluster_config(home)
    try:
        state = ControlClient(config.control_url, timeout=5).state()
    except Exception as exc:
        raise fail(
            f"the control plane at {config.control_url} does not answer ({exc}); "
            "start the cluster with `anycast up`"
        ) from exc
    if as_json:
        console.print_json(json.dumps(state))
        return
    console.print(_regions_table(state))
    console.print(_deployments_table(state))
    console.print(_replicas_table(state))


def _regions_table(state: dict) -> Table:
    table = Table(title="regions")
    for column in ("region", "location", "agent", "last seen"):
        table.add_column(column)
    now = time.time()
    for region in state.get("regions", []):
        seen = region.get("last_seen")
        age = f"{now - seen:.0f} s ago" if seen else "never"
        where = f"{region.get('latitude', 0):.1f}, {region.get('longitude', 0):.1f}"
        table.add_row(region["name"], where, region.get("agent_url") or "-", age)
    return table


def _deployments_table(state: dict) -> Table:
    table = Table(title="deployments")
    for column in ("deployment", "artifact", "replicas wanted", "revision"):
        table.add_column(column)
    for dep in state.get("deployments", []):
        wanted = ", ".join(f"{r}={n}" for r, n in sorted(dep.get("replicas", {}).items()))
        table.add_row(dep["name"], dep["artifact"][:12], wanted, str(dep.get("revision", "")))
    return table


def _replicas_table(state: dict) -> Table:
    table = Table(title="replicas")
    for column in ("replica", "region", "state", "endpoint", "restarts", "last error"):
        table.add_column(column)
    colours = {"ready": "green", "starting": "yellow", "failed": "red", "stopping": "yellow"}
    for rep in sorted(state.get("replicas", []), key=lambda r: (r["region"], r["id"])):
        st = rep.get("state", "?")
        table.add_row(
            rep["id"],
            rep["region"],
            f"[{colours.get(st, 'white')}]{st}[/]",
            rep.get("endpoint") or "-",
            str(rep.get("restarts", 0)),
            (rep.get("last_error") or "")[:60],
        )
    return table


def deploy(
    name: Annotated[str, typer.Argument(help="Deployment name, such as digits.")],
    artifact: Annotated[str, typer.Option(help="Artifact id, id prefix or NAME:VERSION.")],
    replicas: Annotated[int, typer.Option(help="Replicas in every region.")] = 1,
    region: Annotated[
        list[str] | None, typer.Option(help="Per-region count as REGION=COUNT; repeatable.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait until every replica is ready.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 120.0,
    home: HomeOption = None,
) -> None:
    """Create or update a deployment: which artifact runs, with how many replicas per region."""
    config = cluster_config(home)
    try:
        result = deploy_artifact(config, name, artifact, replicas, region or [])
        console.print(
            f"deployment [bold]{name}[/bold] -> artifact {result['artifact'][:12]} "
            f"(revision {result['revision']})"
        )
        if wait:
            with console.status("waiting for replicas to be ready"):
                wait_ready(config.control_url, name, _positive(result["replicas"]), timeout)
            console.print("every replica is ready")
    except AnycastError as exc:
        raise fail(exc) from exc


def _positive(counts: dict[str, int]) -> dict[str, int]:
    return {region: n for region, n in counts.items() if n > 0}


def deploy_artifact(
    config: ClusterConfig, name: str, ref: str, replicas: int, per_region: list[str]
) -> dict:
    """Resolve ``ref`` in the registry and compare-and-set the deployment to it."""
    from anycast.control.client import ControlClient
    from anycast.core.errors import NotFound
    from anycast.registry import LocalStorage, Registry

    artifact_id = Registry(LocalStorage(config.registry_dir)).resolve(ref)
    control = ControlClient(config.control_url)
    counts = parse_replicas(replicas, per_region, [r.name for r in config.regions])
    try:
        revision = int(control.deployment(name)["revision"])
    except NotFound:
        revision = 0
    return control.put_deployment(name, artifact_id, counts, revision=revision)


def predict(
    image: Annotated[Path, typer.Argument(help="A PNG or JPEG of a digit.", exists=True)],
    deployment: Annotated[str, typer.Option(help="Deployment to call.")] = "digits",
    handler: Annotated[str, typer.Option(help="Handler to call.")] = "predict",
    caller_region: Annotated[
        str | None, typer.Option("--from", help="Caller's region (X-Anycast-Region).")
    ] = None,
    home: HomeOption = None,
) -> None:
    """Call a deployment through the gateway with one image and print the answer."""
    import httpx

    config = cluster_config(home)
    body = {"image": base64.b64encode(image.read_bytes()).decode()}
    headers = {"x-anycast-region": caller_region} if caller_region else {}
    url = f"{config.gateway_url}/v1/deployments/{deployment}/{handler}"
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise fail(f"the gateway at {config.gateway_url} does not answer ({exc})") from exc
    answer = response.json()
    if response.status_code != 200:
        raise fail(answer.get("error", {}).get("message", response.text))
    digit, probability = answer.get("digit"), answer.get("probability")
    console.print(
        f"digit [bold]{digit}[/bold] (p={probability:.3f}) served by "
        f"{response.headers.get('x-anycast-region')} / {response.headers.get('x-anycast-replica')}"
    )


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(down)
    app.command()(status)
    app.command()(deploy)
    app.command()(predict)
    from anycast.cli.demo import demo

    app.command()(demo)
