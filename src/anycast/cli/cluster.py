"""Commands for a whole cluster: up, down, status, deploy, rollback, predict, demo."""

from __future__ import annotations

import base64
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from anycast.core.config import ClusterConfig, default_home, load_config
from anycast.core.errors import AnycastError, InvalidInput, Unavailable
from anycast.core.names import check_handler, check_name

CAS_ATTEMPTS = 3

console = Console()
err_console = Console(stderr=True)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="Cluster home folder (default: $ANYCAST_HOME, else .anycast)."),
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


def existing_cluster(home: Path | None) -> ClusterConfig:
    """The configuration of a cluster that exists: a ``--home`` given without a cluster.yaml
    in it exits with 2, rather than falling back to the default ports (another cluster's)."""
    if home is not None and not (home / "cluster.yaml").is_file():
        raise fail(missing_cluster_message(home), 2)
    try:
        return cluster_config(home)
    except AnycastError as exc:
        raise fail(exc, 2) from exc


def missing_cluster_message(home: Path) -> str:
    what = "does not exist" if not home.exists() else "holds no cluster.yaml"
    return (
        f"no cluster at --home {home}: the folder {what}; start a cluster there with "
        f"`anycast up --home {home}`, or leave out --home for $ANYCAST_HOME, else .anycast"
    )


def fail(exc: AnycastError | str, code: int = 1) -> typer.Exit:
    message = exc.message if isinstance(exc, AnycastError) else exc
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def parse_replicas(
    replicas: int | None,
    per_region: list[str],
    regions: list[str],
    current: dict[str, int] | None = None,
) -> dict[str, int]:
    """``--replicas 2`` everywhere, overridden by ``--region eu-west=3`` entries.

    Without ``--replicas`` a deployment keeps its ``current`` counts (1 per region if new).
    """
    if replicas is None and current is not None:
        counts = dict(current)
    else:
        counts = dict.fromkeys(regions, 1 if replicas is None else replicas)
    for item in per_region:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise InvalidInput(f"--region takes REGION=COUNT, such as eu-west=2, got {item!r}")
        counts[name.strip()] = int(value)
    return counts


def wait_ready(
    control_url: str, deployment: str, want: dict[str, int], timeout: float = 120.0
) -> list[dict]:
    """Block until every region has ``want[region]`` ready replicas of ``deployment``.

    Only replicas of the artifact the deployment rolls out to count, so a rolling update
    is waited for to the end.
    """
    from anycast.control.client import ControlClient

    control = ControlClient(control_url)
    deadline = time.monotonic() + timeout
    while True:
        target = control.deployment(deployment)["artifact"]
        replicas = control.replicas(deployment=deployment)
        ready: dict[str, int] = {}
        for replica in replicas:
            if replica.get("state") == "ready" and replica.get("artifact") == target:
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


def parse_canary(text: str) -> int:
    """``--canary 10%`` (or ``10``) as a whole percent."""
    value = text.strip().removesuffix("%").strip()
    if not value.isdigit() or not 1 <= int(value) <= 99:
        raise InvalidInput(f"--canary takes a share of the replicas from 1% to 99%, got {text!r}")
    return int(value)


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, flag: str) -> float:
    """``2s``, ``500ms``, ``1.5m``, ``1h`` or a plain number of seconds, as seconds."""
    match = _DURATION.match(text)
    if not match:
        raise InvalidInput(
            f"{flag} takes a duration such as 2s, 500ms, 1m or 1h (or seconds), got {text!r}"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


def autoscaling_policy(
    min_replicas: int | None,
    max_replicas: int | None,
    target_in_flight: float | None,
    scale_up_delay: str | None,
    scale_down_delay: str | None,
    idle_to_zero: str | None,
) -> dict[str, Any] | None:
    """The policy the autoscaling flags give (the control plane fills in defaults), or None."""
    policy: dict[str, Any] = {}
    for field, value in (
        ("min_replicas", min_replicas),
        ("max_replicas", max_replicas),
        ("target_in_flight", target_in_flight),
    ):
        if value is not None:
            policy[field] = value
    for field, text in (
        ("scale_up_delay", scale_up_delay),
        ("scale_down_delay", scale_down_delay),
        ("idle_to_zero", idle_to_zero),
    ):
        if text is not None:
            policy[field] = parse_duration(text, "--" + field.replace("_", "-"))
    return policy or None


def merge_autoscaling(
    current: dict[str, Any] | None, policy: dict[str, Any], regions: list[str]
) -> dict[str, Any]:
    """``policy`` for ``regions`` (every region when empty), other regions' policies kept."""
    if not regions:
        return {"*": policy}
    merged = dict(current or {})
    merged.update(dict.fromkeys(regions, policy))
    return merged


def rollout_settled(
    deployment: dict[str, Any],
    replicas: list[dict[str, Any]],
    counts: dict[str, int] | None = None,
) -> bool:
    """Whether every region runs what ``deployment`` wants of it, ready, and no rollout moves.

    ``counts`` are the replicas wanted per region now (autoscaled counts), if not the fixed ones.
    """
    from anycast.control.rollout import ROLLING, artifacts_for_region
    from anycast.control.scaling import with_counts

    if (deployment.get("rollout") or {}).get("state") == ROLLING:
        return False
    if counts is not None:
        deployment = with_counts(deployment, counts)
    for region in deployment.get("replicas", {}):
        ready = Counter(
            r["artifact"] for r in replicas if r["region"] == region and r.get("state") == "ready"
        )
        wanted = artifacts_for_region(deployment, region)
        if any(ready[artifact] < n for artifact, n in wanted.items()):
            return False
    return True


def wait_rollout(
    control_url: str,
    name: str,
    timeout: float = 120.0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Block until ``name``'s rollout settled; fail early on a crash-looping new replica.

    ``progress`` is told the rollout's state in words whenever it is polled.
    """
    from anycast.control.client import ControlClient

    control = ControlClient(control_url)
    deadline = time.monotonic() + timeout
    while True:
        deployment = control.deployment(name)
        replicas = control.replicas(deployment=name)
        wanted = {r: row["desired"] for r, row in control.scale(name)["regions"].items()}
        if rollout_settled(deployment, replicas, wanted):
            return deployment
        if progress is not None:
            ready = sum(1 for r in replicas if r.get("state") == "ready")
            progress(f"rollout: {_rollout_text(deployment)}; {ready} replicas ready")
        looping = [
            r
            for r in replicas
            if r.get("state") == "crash-loop" and r.get("artifact") == deployment["artifact"]
        ]
        if looping:
            r = looping[0]
            raise Unavailable(
                f"replica {r['id']} of artifact {r['artifact'][:12]} is in a crash loop "
                f"({r.get('restarts', 0)} restarts; last error: {r.get('last_error')}); the "
                f"rollout waits and the old replicas keep serving; see `anycast status`, "
                f"undo it with `anycast rollback {name}`"
            )
        if time.monotonic() > deadline:
            raise Unavailable(
                f"deployment {name} has not settled after {timeout:.0f} s "
                f"(rollout: {_rollout_text(deployment)}); see `anycast status`"
            )
        time.sleep(0.25)


def up(
    home: HomeOption = None,
    control_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Control-plane port.")
    ] = None,
    gateway_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Gateway port.")
    ] = None,
    agent_port_base: Annotated[
        int | None, typer.Option(min=1, max=65535, help="First region agent port.")
    ] = None,
    data_plane: Annotated[
        str | None,
        typer.Option(
            help="Gateway data plane: python, or haproxy (HAProxy carries the calls; needs "
            "Debian's haproxy). Kept in cluster.yaml."
        ),
    ] = None,
) -> None:
    """Start the control plane, one agent per region and the gateway in the background."""
    from anycast.gateway.haproxy import check_data_plane, haproxy_binary
    from anycast.local import LocalCluster

    config = cluster_config(home, control_port, gateway_port, agent_port_base)
    try:
        if data_plane is not None:
            config = config.model_copy(update={"gateway_data_plane": check_data_plane(data_plane)})
        if config.gateway_data_plane == "haproxy":
            haproxy_binary()
    except AnycastError as exc:
        raise fail(exc, 2) from exc
    cluster = LocalCluster(config)
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

    cluster = LocalCluster(existing_cluster(home))
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

    config = existing_cluster(home)
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
    console.print(_scaling_table(state))
    console.print(_replicas_table(state))
    errors = _replica_errors(state)
    if errors:
        console.print("last errors:")
    for line in errors:
        console.print(f"  {line}")


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
    for column in ("deployment", "artifact", "replicas wanted", "autoscaling", "rollout"):
        table.add_column(column)
    table.add_column("revision")
    for dep in state.get("deployments", []):
        wanted = ", ".join(f"{r}={n}" for r, n in sorted(dep.get("replicas", {}).items()))
        table.add_row(
            dep["name"],
            dep["artifact"][:12],
            wanted,
            _autoscaling_text(dep),
            _rollout_text(dep),
            str(dep.get("revision", "")),
        )
    return table


def _autoscaling_text(dep: dict[str, Any]) -> str:
    """Each policy in one line: ``*: 0-4 replicas, 4 in flight each, up 2s, down 30s, ...``."""
    from anycast.control.scaling import describe

    policies = dep.get("autoscaling") or {}
    if not policies:
        return "fixed"
    return "\n".join(f"{scope}: {describe(policy)}" for scope, policy in sorted(policies.items()))


def _scaling_table(state: dict) -> Table:
    """Per deployment and region: the replicas wanted now against those observed."""
    from anycast.control.scaling import effective_counts, policy_for, reports_by_region

    table = Table(title="replicas per region (wanted now vs. observed)")
    for column in ("deployment", "region", "mode", "wanted", "ready", "observed", "in flight"):
        table.add_column(column)
    rows = state.get("autoscaling", [])
    reports = reports_by_region(rows)
    load = {(r["deployment"], r["region"]): r.get("in_flight") for r in rows}
    replicas = [r for r in state.get("replicas", []) if r.get("state") != "stopping"]
    for dep in state.get("deployments", []):
        name = dep["name"]
        for region, count in effective_counts(dep, reports).items():
            mine = [r for r in replicas if r["deployment"] == name and r["region"] == region]
            auto = policy_for(dep, region) is not None
            in_flight = load.get((name, region))
            table.add_row(
                name,
                region,
                "auto" if auto else "fixed",
                str(count),
                str(sum(1 for r in mine if r.get("state") == "ready")),
                str(len(mine)),
                "-" if in_flight is None else f"{in_flight:g}",
            )
    return table


def _rollout_text(dep: dict[str, Any]) -> str:
    """A deployment's rollout in one line: ``rolling from 3f2a: done eu-west; now us-east``."""
    rollout = dep.get("rollout") or {}
    state = rollout.get("state")
    if not state:
        return "-"
    source = str(rollout.get("from") or "")[:12]
    if state == "canary":
        return f"canary {rollout.get('canary_percent')}% (old: {source}); promote or roll back"
    if state == "rolling":
        done = ", ".join(rollout.get("done", [])) or "none"
        return f"rolling from {source}: done {done}; now {rollout.get('current')}"
    if state == "rolled-back":
        return f"rolled back from {source} (never serves again)"
    return f"{state} (from {source})"


def _replicas_table(state: dict) -> Table:
    table = Table(title="replicas")
    for column in ("replica", "region", "artifact", "state", "restarts", "endpoint"):
        # The state never wraps; the others fold rather than lose characters.
        table.add_column(column, no_wrap=column == "state", overflow="fold")
    colours = {
        "ready": "green",
        "starting": "yellow",
        "failed": "red",
        "crash-loop": "bold red",
        "stopping": "yellow",
    }
    for rep in sorted(state.get("replicas", []), key=lambda r: (r["region"], r["id"])):
        st = rep.get("state", "?")
        table.add_row(
            rep["id"],
            rep["region"],
            str(rep.get("artifact", ""))[:8],
            f"[{colours.get(st, 'white')}]{st}[/]",
            str(rep.get("restarts", 0)),
            rep.get("endpoint") or "-",
        )
    return table


def _replica_errors(state: dict) -> list[str]:
    """One line per replica with a last error, in full: tables would cut it."""
    return [
        f"[red]{rep['id']}[/red] ({rep.get('state')}, {rep.get('restarts', 0)} restarts): "
        f"{escape(str(rep['last_error']))}"
        for rep in sorted(state.get("replicas", []), key=lambda r: (r["region"], r["id"]))
        if rep.get("last_error")
    ]


def deploy(
    name: Annotated[str, typer.Argument(help="Deployment name, such as digits.")],
    artifact: Annotated[
        str | None,
        typer.Option(
            help="Artifact id, id prefix or NAME:VERSION (default: the deployment's current one)."
        ),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(help="Replicas in every region (default: the current counts; 1 if new)."),
    ] = None,
    region: Annotated[
        list[str] | None, typer.Option(help="Per-region count as REGION=COUNT; repeatable.")
    ] = None,
    canary: Annotated[
        str | None,
        typer.Option(
            help="Run the new artifact on this share of every region's replicas, e.g. 10%."
        ),
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="Roll the running canary out to every replica.")
    ] = False,
    allow_rolled_back: Annotated[
        bool,
        typer.Option("--allow-rolled-back", help="Deploy an artifact this deployment rolled back."),
    ] = False,
    min_replicas: Annotated[
        int | None, typer.Option(help="Autoscaling: fewest replicas per region (0: scale to zero).")
    ] = None,
    max_replicas: Annotated[
        int | None, typer.Option(help="Autoscaling: most replicas per region (turns it on).")
    ] = None,
    target_in_flight: Annotated[
        float | None, typer.Option(help="Autoscaling: calls in flight per replica to aim for.")
    ] = None,
    scale_up_delay: Annotated[
        str | None, typer.Option(help="Autoscaling: how long load must stay high, e.g. 5s.")
    ] = None,
    scale_down_delay: Annotated[
        str | None, typer.Option(help="Autoscaling: how long load must stay low, e.g. 60s.")
    ] = None,
    idle_to_zero: Annotated[
        str | None, typer.Option(help="Autoscaling with --min-replicas 0: idle time before 0.")
    ] = None,
    autoscale_region: Annotated[
        list[str] | None,
        typer.Option(help="Autoscale only this region (repeatable; default: every region)."),
    ] = None,
    no_autoscale: Annotated[
        bool, typer.Option("--no-autoscale", help="Remove the autoscaling policies.")
    ] = False,
    wait: Annotated[bool, typer.Option(help="Wait until the rollout is done and ready.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 120.0,
    home: HomeOption = None,
) -> None:
    """Create or update a deployment; a new artifact rolls out region by region (or as a canary).

    The autoscaling flags give the deployment a policy: each region's agent then keeps its
    count between --min-replicas and --max-replicas from the calls in flight. Without
    --artifact an existing deployment keeps its artifact and only its counts or policies change.
    """
    config = existing_cluster(home)
    try:
        check_name(name, "deployment name")
        policy = autoscaling_policy(
            min_replicas,
            max_replicas,
            target_in_flight,
            scale_up_delay,
            scale_down_delay,
            idle_to_zero,
        )
        if no_autoscale and (policy or autoscale_region):
            raise InvalidInput("--no-autoscale takes no other autoscaling flag")
        if autoscale_region and policy is None:
            raise InvalidInput("--autoscale-region needs a policy: give --max-replicas N")
        scaling: dict[str, Any] | None = {} if no_autoscale else None
        if promote:
            if artifact or canary:
                raise InvalidInput(
                    "--promote takes no --artifact or --canary: it finishes a canary"
                )
            result = _control(config).promote(name)
        elif canary and not artifact:
            raise InvalidInput("--canary needs --artifact REF: the artifact to run on the canary")
        elif not (artifact or replicas is not None or region or policy or no_autoscale):
            raise InvalidInput(
                "nothing to change: give --artifact REF to deploy an artifact, --replicas N or "
                "--region REGION=COUNT to scale, or --promote to finish a running canary"
            )
        else:
            percent = parse_canary(canary) if canary is not None else None
            result = deploy_artifact(
                config,
                name,
                artifact,
                replicas,
                region or [],
                canary_percent=percent,
                allow_rolled_back=allow_rolled_back,
                autoscaling=scaling,
                policy=policy,
                policy_regions=autoscale_region or [],
            )
        console.print(
            f"deployment [bold]{name}[/bold] -> artifact {result['artifact'][:12]} "
            f"(revision {result['revision']}; rollout: {_rollout_text(result)})"
        )
        if wait:
            with console.status("waiting for the rollout and the replicas") as spinner:
                settled = wait_rollout(config.control_url, name, timeout, spinner.update)
            console.print(f"every replica is ready (rollout: {_rollout_text(settled)})")
    except AnycastError as exc:
        raise fail(exc) from exc


def rollback(
    name: Annotated[str, typer.Argument(help="Deployment to roll back.")],
    wait: Annotated[bool, typer.Option(help="Wait until the old artifact serves again.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 120.0,
    home: HomeOption = None,
) -> None:
    """Go back to the previous artifact everywhere; the current one never serves again."""
    config = existing_cluster(home)
    try:
        check_name(name, "deployment name")
        result = _control(config).rollback(name)
        bad = (result.get("rollout") or {}).get("from", "")
        console.print(
            f"deployment [bold]{name}[/bold] rolled back to artifact {result['artifact'][:12]}; "
            f"artifact {bad[:12]} will not serve it again"
        )
        if wait:
            with console.status("waiting for the previous artifact's replicas"):
                wait_rollout(config.control_url, name, timeout)
            console.print("every replica is ready")
    except AnycastError as exc:
        raise fail(exc) from exc


def _control(config: ClusterConfig) -> Any:
    from anycast.control.client import ControlClient

    return ControlClient(config.control_url)


def _positive(counts: dict[str, int]) -> dict[str, int]:
    return {region: n for region, n in counts.items() if n > 0}


def deploy_artifact(
    config: ClusterConfig,
    name: str,
    ref: str | None,
    replicas: int | None,
    per_region: list[str],
    *,
    canary_percent: int | None = None,
    allow_rolled_back: bool = False,
    autoscaling: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    policy_regions: list[str] | None = None,
) -> dict:
    """Resolve ``ref`` in the registry and compare-and-set the deployment to it.

    Without ``ref`` an existing deployment keeps its artifact (only its counts and policies
    change); a deployment that does not exist yet is refused, as it needs one.
    ``autoscaling`` replaces the policies ({} removes them; None keeps them), or ``policy``
    is set for ``policy_regions`` (every region when empty) next to the other regions'.
    A conflict with a change made meanwhile (a rollout moving on) is retried on the new
    revision, a few times.
    """
    from anycast.core.errors import Conflict, NotFound
    from anycast.registry import LocalStorage, Registry

    artifact_id = Registry(LocalStorage(config.registry_dir)).resolve(ref) if ref else None
    control = _control(config)
    regions = [r.name for r in config.regions]
    attempt = 1
    while True:
        try:
            current = control.deployment(name)
        except NotFound:
            if artifact_id is None:
                raise InvalidInput(
                    f"deployment {name!r} does not exist yet, so there is no artifact to keep; "
                    "give --artifact REF (an artifact id, id prefix or NAME:VERSION) to create it",
                    code="unknown_deployment",
                ) from None
            current = {"revision": 0, "replicas": None}
        counts = parse_replicas(replicas, per_region, regions, current["replicas"])
        policies = autoscaling
        if policy is not None:
            policies = merge_autoscaling(current.get("autoscaling"), policy, policy_regions or [])
        try:
            result: dict[str, Any] = control.put_deployment(
                name,
                artifact_id or str(current["artifact"]),
                counts,
                revision=int(current["revision"]),
                canary_percent=canary_percent,
                allow_rolled_back=allow_rolled_back,
                autoscaling=policies,
            )
            return result
        except Conflict as exc:
            if "revision" not in exc.details or attempt >= CAS_ATTEMPTS:
                raise
            attempt += 1


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

    try:
        check_name(deployment, "--deployment")
        check_handler(handler)
    except AnycastError as exc:
        raise fail(exc) from exc
    config = existing_cluster(home)
    if image.is_dir():
        raise fail(f"{image} is a folder; give the path of one PNG or JPEG file")
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
    app.command()(rollback)
    app.command()(predict)
    from anycast.cli.demo import demo

    app.command()(demo)
