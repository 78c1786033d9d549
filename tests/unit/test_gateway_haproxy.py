"""The HAProxy data plane's configuration, rendered from a routing table."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from anycast.cli.main import app
from anycast.core.config import DEFAULT_REGIONS, ClusterConfig, load_config
from anycast.core.errors import ConfigError
from anycast.gateway.haproxy import (
    Settings,
    check_data_plane,
    haproxy_binary,
    plan_of,
    render,
    usable_servers,
)
from anycast.gateway.routing import ReplicaHealth, RoutingTable
from anycast.gateway.server import _call_path

SETTINGS = Settings(
    public_port=18080, python_port=18081, socket_path="/tmp/x.sock", gateway_region="us-east"
)
HANDLERS = {
    "echo": {"idempotent": True, "deterministic": False},
    "charge": {"idempotent": False, "deterministic": False},
    "lookup": {"idempotent": True, "deterministic": True},
}


def replica(rid: str, region: str, port: int, state: str = "ready", dep: str = "echo") -> dict:
    endpoint = f"http://127.0.0.1:{port}"
    return {"id": rid, "deployment": dep, "region": region, "endpoint": endpoint, "state": state}


def table(*replicas: dict[str, Any], handlers: dict[str, Any] | None = None) -> RoutingTable:
    manifest = {"handlers": HANDLERS if handlers is None else handlers}
    state = {
        "revision": 7,
        "deployments": [{"name": "echo", "artifact": "a1"}, {"name": "plain", "artifact": "a2"}],
        "artifacts": [{"id": "a1", "manifest": manifest}, {"id": "a2", "manifest": {}}],
        "replicas": list(replicas),
    }
    return RoutingTable.from_state(state, DEFAULT_REGIONS)


TWO_REGIONS = (
    replica("echo-us-east-0", "us-east", 9001),
    replica("echo-us-east-1", "us-east", 9002),
    replica("echo-eu-west-0", "eu-west", 9003),
)


def rendered(t: RoutingTable, settings: Settings = SETTINGS, **kwargs: Any) -> str:
    plan = plan_of(t, settings, **kwargs)
    return render(plan, usable_servers(plan, t, ReplicaHealth(), now=0.0))


def use_backends(config: str, caller: str) -> list[str]:
    pattern = rf"use_backend (\S+) if call\.echo from\.{caller} "
    return re.findall(pattern, config)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs Debian's haproxy")
def test_rendered_config_is_accepted_by_haproxy(tmp_path: Path) -> None:
    path = tmp_path / "haproxy.cfg"
    path.write_text(rendered(table(*TWO_REGIONS, replica("plain-eu-west-0", "eu-west", 9004))))

    check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)

    assert check.returncode == 0, check.stderr


def test_each_caller_region_tries_backends_nearest_first() -> None:
    config = rendered(table(*TWO_REGIONS))

    assert use_backends(config, "us-east") == ["echo.us-east", "echo.eu-west"]
    assert use_backends(config, "eu-west") == ["echo.eu-west", "echo.us-east"]
    assert use_backends(config, "ap-southeast") == ["echo.eu-west", "echo.us-east"]
    # A backend is chosen only while one of its servers is up.
    assert "acl up.echo.us-east srv_is_up(echo.us-east/echo-us-east-1)" in config


def test_calls_without_region_header_count_as_the_gateways_region() -> None:
    config = rendered(table(*TWO_REGIONS))

    assert "acl from.us-east req.fhdr_cnt(X-Anycast-Region) eq 0" in config
    assert "acl from.eu-west req.fhdr_cnt(X-Anycast-Region) eq 0" not in config


def test_region_backend_balances_checks_and_retries_then_falls_back_to_python() -> None:
    config = rendered(table(*TWO_REGIONS))
    backend = config.split("backend echo.us-east\n")[1].split("\n\n")[0]

    assert "balance leastconn" in backend and "http-reuse always" in backend
    assert "option httpchk GET /readyz" in backend
    assert "on-error mark-down" in backend and "option redispatch 1" in backend
    assert "retries 3" in backend  # both replicas, then the Python app
    assert "server echo-us-east-0 127.0.0.1:9001\n" in backend + "\n"
    assert "server python 127.0.0.1:18081 backup no-check" in backend
    assert "replace-path ^/v1/deployments/[^/]+/(.*) /v1/\\1" in backend


def test_only_non_deterministic_handlers_go_through_haproxy() -> None:
    config = rendered(table(*TWO_REGIONS))

    assert "acl call.echo path /v1/deployments/echo/charge /v1/deployments/echo/echo" in config
    assert "lookup" not in config  # deterministic: Python answers it from its cache


def test_non_idempotent_handlers_are_retried_only_on_connection_failure() -> None:
    config = rendered(table(*TWO_REGIONS))

    assert "http-request disable-l7-retry if { path /v1/deployments/echo/charge }" in config


def test_a_deployment_without_declarations_routes_every_valid_handler_name() -> None:
    config = rendered(table(replica("plain-eu-west-0", "eu-west", 9004, dep="plain")))

    assert "acl call.plain path_reg ^/v1/deployments/plain/[A-Za-z_][A-Za-z0-9_]{0,63}$" in config
    assert "disable-l7-retry" not in config


def test_deployment_with_only_cached_handlers_is_left_to_python() -> None:
    only_cached = {"lookup": {"idempotent": True, "deterministic": True}}

    config = rendered(table(*TWO_REGIONS, handlers=only_cached))

    assert "backend echo." not in config and "call.echo" not in config


def test_a_deployment_without_replicas_is_left_to_python_to_hold() -> None:
    config = rendered(table())

    assert "use_backend echo" not in config
    assert "default_backend python" in config


def test_replicas_the_python_view_keeps_out_start_disabled() -> None:
    t = table(*TWO_REGIONS, replica("echo-eu-west-1", "eu-west", 9005, state="starting"))
    health = ReplicaHealth()
    health.record_probe("echo-us-east-1", ready=False)
    plan = plan_of(t, SETTINGS)

    config = render(plan, usable_servers(plan, t, health, now=0.0))

    assert "server echo-us-east-1 127.0.0.1:9002 disabled" in config
    assert "server echo-eu-west-1 127.0.0.1:9005 disabled" in config
    assert "server echo-us-east-0 127.0.0.1:9001\n" in config
    # A state change needs no reload: the plan (backends and servers) stays the same.
    health.record_probe("echo-us-east-1", ready=True)
    assert plan_of(t, SETTINGS) == plan
    assert "echo.us-east/echo-us-east-1" in usable_servers(plan, t, health, now=0.0)


def test_python_keeps_calls_it_must_check_or_that_set_their_own_deadline() -> None:
    config = rendered(table(*TWO_REGIONS))

    assert "acl python_only req.hdr_cnt(X-Anycast-Timeout-Ms) gt 0" in config
    assert "acl python_only req.fhdr_cnt(X-Anycast-Region) gt 1" in config
    assert "acl python_only req.hdr_cnt(Content-Length) eq 0" in config
    assert "acl python_only req.hdr_val(Content-Length) gt 33554432" in config  # Python's 413
    assert "use_backend python if !call || python_only" in config
    assert "http-request del-header X-Anycast-Call-Path" in config  # callers cannot forge it


def test_draining_sends_everything_to_python() -> None:
    config = rendered(table(*TWO_REGIONS), draining=True)

    assert "use_backend echo" not in config and "backend echo." not in config


def test_with_simulated_latency_haproxy_serves_only_the_callers_own_region() -> None:
    settings = Settings(**{**SETTINGS.__dict__, "simulate_latency": True})

    config = rendered(table(*TWO_REGIONS), settings)

    assert use_backends(config, "us-east") == ["echo.us-east"]
    assert use_backends(config, "ap-southeast") == []


def test_listens_on_loopback_only_and_logs_nothing() -> None:
    config = rendered(table(*TWO_REGIONS))

    assert "bind 127.0.0.1:18080" in config
    assert re.search(r"^\s*log\b", config, re.MULTILINE) is None


def test_replicas_not_on_plain_http_are_left_to_python() -> None:
    odd = {**replica("echo-eu-west-9", "eu-west", 9009), "endpoint": "https://10.0.0.1:443"}

    config = rendered(table(*TWO_REGIONS, odd))

    assert "echo-eu-west-9" not in config


def test_unknown_data_plane_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="python, haproxy"):
        check_data_plane("nginx")


def test_missing_haproxy_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")

    with pytest.raises(ConfigError, match="apt-get install -y haproxy"):
        haproxy_binary()


def test_python_app_behind_haproxy_takes_the_original_call_path_header() -> None:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/echo",
        "headers": [(b"x-anycast-call-path", b"/v1/deployments/echo/echo")],
    }

    match = _call_path(scope, behind_haproxy=True)

    assert match is not None and match.groups() == ("echo", "echo")
    assert _call_path(scope, behind_haproxy=False) is None


def test_gateway_and_up_refuse_an_unknown_data_plane(tmp_path: Path) -> None:
    runner = CliRunner()
    home = str(tmp_path / "home")
    gateway = runner.invoke(app, ["gateway", "--home", home, "--data-plane", "nginx"])
    up = runner.invoke(app, ["up", "--home", home, "--data-plane", "nginx"])

    for result in (gateway, up):
        assert result.exit_code == 2
        assert "--data-plane must be one of python, haproxy, got 'nginx'" in result.output


def test_data_plane_is_kept_in_the_cluster_config(tmp_path: Path) -> None:
    ClusterConfig(home=tmp_path, gateway_data_plane="haproxy").save()

    assert load_config(tmp_path).gateway_data_plane == "haproxy"
    assert ClusterConfig(home=tmp_path).gateway_data_plane == "python"  # the default
