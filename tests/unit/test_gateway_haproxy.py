"""The HAProxy data plane's configuration, rendered from a routing table."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from anycast.cli.main import app
from anycast.core.config import DEFAULT_REGIONS, ClusterConfig, load_config
from anycast.core.errors import ConfigError
from anycast.gateway.haproxy import (
    MAX_SOCKET_PATH,
    HaproxySupervisor,
    Settings,
    check_data_plane,
    error_pages,
    haproxy_binary,
    haproxy_paths,
    plan_of,
    render,
    usable_servers,
    write_error_pages,
)
from anycast.gateway.routing import ReplicaHealth, RoutingTable
from anycast.gateway.server import Gateway, _call_path, create_gateway_app

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
    settings = replace(SETTINGS, error_dir=str(tmp_path / "errors"))
    write_error_pages(settings)
    path = tmp_path / "haproxy.cfg"
    t = table(*TWO_REGIONS, replica("plain-eu-west-0", "eu-west", 9004))
    path.write_text(rendered(t, settings))

    check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)

    assert check.returncode == 0, check.stderr
    assert "errorfile 400 " in path.read_text()


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


def _page(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, body = raw.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def test_haproxys_own_errors_are_json_like_the_python_gateways() -> None:
    settings = replace(SETTINGS, error_dir="/run/x/errors")
    pages = error_pages(settings)
    config = rendered(table(*TWO_REGIONS), settings)

    assert {400, 403, 408, 500, 502, 503, 504} <= set(pages)
    for status, raw in pages.items():
        code, headers, body = _page(raw)
        assert code == status
        assert headers["content-type"] == "application/json"
        assert int(headers["content-length"]) == len(raw.split(b"\r\n\r\n", 1)[1])
        assert set(body["error"]) == {"code", "message"}
        # errorfile, not http-error: HAProxy answers its parse errors only with errorfiles.
        assert f"errorfile {status} /run/x/errors/{status}.http" in config
    assert "http-error" not in config
    codes = {status: _page(raw)[2]["error"]["code"] for status, raw in pages.items()}
    assert codes[408] == "body_timeout" and codes[503] == "unavailable"
    assert codes[502] == "replica_dropped" and codes[504] == "replica_timeout"
    assert codes[500] == "internal"
    assert _page(pages[503])[1]["retry-after"] == "1"  # as Python's 503s
    message = _page(pages[400])[2]["error"]["message"]
    assert "HTTP/1.1" in message and "Content-Length" in message and "31 KiB" in message


def test_buffers_take_the_request_lines_and_headers_python_takes() -> None:
    config = rendered(table(*TWO_REGIONS))

    assert "tune.bufsize 32768" in config and "tune.maxrewrite 1024" in config
    assert "maxconn 4096" in config


def test_http_versions_other_than_1_0_and_1_1_are_refused_with_json() -> None:
    config = rendered(table(*TWO_REGIONS))
    rule = next(line.strip() for line in config.splitlines() if "req.ver" in line)

    assert rule.startswith("http-request return status 400 content-type application/json")
    assert rule.endswith("if !{ req.ver 1.1 } !{ req.ver 1.0 }")
    body = json.loads(rule.split("lf-string '", 1)[1].split("'", 1)[0].replace("%[req.ver]", "9.9"))
    assert body["error"]["code"] == "unsupported_http_version"
    assert body["error"]["message"] == "HTTP/9.9 is not supported: send HTTP/1.1 or HTTP/1.0"
    # Before anything else in the frontend, so no such request reaches a backend.
    frontend = config.split("frontend anycast\n")[1]
    assert frontend.index("req.ver") < frontend.index("use_backend")


def test_a_body_may_take_long_but_not_stall_longer_than_pythons_body_timeout() -> None:
    default = rendered(table(*TWO_REGIONS))
    short = rendered(table(*TWO_REGIONS), replace(SETTINGS, body_timeout=5.0))

    assert "timeout client 30000ms" in default  # Python's default ANYCAST_BODY_TIMEOUT_S
    assert "timeout http-request 120000ms" in default
    assert "timeout client 5000ms" in short
    message = _page(error_pages(replace(SETTINGS, body_timeout=5.0))[408])[2]["error"]["message"]
    assert "no byte for 5 s" in message and "120 s" in message


def test_haproxy_files_live_in_the_home_beside_the_gateways_pid_file() -> None:
    run_dir, socket_dir = haproxy_paths(Path("/srv/app/.anycast"), 8080)  # nothing is created

    assert run_dir == socket_dir == Path("/srv/app/.anycast/run/haproxy-8080")


def test_a_home_too_long_for_unix_sockets_gets_a_short_socket_folder(tmp_path: Path) -> None:
    home = tmp_path / ("h" * 100)

    run_dir, socket_dir = haproxy_paths(home, 8080)

    assert run_dir == home.resolve() / "run" / "haproxy-8080"
    assert socket_dir != run_dir and len(str(socket_dir / "master.sock")) <= MAX_SOCKET_PATH
    assert haproxy_paths(home, 8080) == (run_dir, socket_dir)  # the same at the next start
    assert haproxy_paths(home, 8081)[1] != socket_dir


def test_healthz_says_which_data_plane_and_whether_haproxy_is_up(tmp_path: Path) -> None:
    gateway = Gateway(ClusterConfig(home=tmp_path))
    settings = replace(SETTINGS, socket_path=str(tmp_path / "stats.sock"))
    supervisor = HaproxySupervisor(gateway, settings, tmp_path, binary="haproxy")

    python = TestClient(create_gateway_app(gateway)).get("/healthz").json()
    haproxy = TestClient(create_gateway_app(gateway, supervisor)).get("/healthz").json()

    assert python["data_plane"] == "python" and "haproxy" not in python
    assert haproxy["data_plane"] == "haproxy"
    assert haproxy["haproxy"]["up"] is False  # not started
