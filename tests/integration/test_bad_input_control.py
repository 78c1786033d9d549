"""A real `anycast control` process answering deployment paths and regions it cannot take."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from cluster import ControlProcess

from anycast.control.client import ControlClient
from anycast.core.errors import InvalidInput
from anycast.core.names import NAME_RULE


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The control plane of a home with the default regions; yields its URL."""
    control = ControlProcess(tmp_path_factory.mktemp("home")).start()
    yield control.url
    control.stop()


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/deployments/a/b", "/v1/deployments/"])
def test_a_deployment_path_without_a_valid_name_states_the_name_rule(
    control: str, method: str, path: str
) -> None:
    body = {"artifact": "digits:1"} if method == "PUT" else None

    answer = httpx.request(method, f"{control}{path}", json=body, timeout=10)

    assert answer.status_code == 400  # not a 404 "no route", nor a 307 redirect
    error = answer.json()["error"]
    assert error["code"] == "invalid_name"
    assert f"a deployment name is {NAME_RULE}" in error["message"]


def test_the_client_gets_the_name_rule_for_a_name_with_a_slash(control: str) -> None:
    with ControlClient(control) as client, pytest.raises(InvalidInput, match="deployment name"):
        client.deployment("a/b")


def test_a_region_outside_the_cluster_config_is_refused_with_how_to_add_it(control: str) -> None:
    body = {"latitude": 4.5, "longitude": 137.4, "agent_url": "http://127.0.0.1:7199"}

    answer = httpx.put(f"{control}/v1/regions/mars", json=body, timeout=10)
    regions = httpx.get(f"{control}/v1/regions", timeout=10).json()

    assert answer.status_code == 400
    message = answer.json()["error"]["message"]
    assert "region 'mars' is not in the cluster's configuration" in message
    assert "configured regions: ap-southeast, eu-west, us-east" in message
    assert "regions list in the cluster's cluster.yaml" in message
    assert "mars" not in [r["name"] for r in regions]


def test_a_configured_region_still_registers(control: str) -> None:
    body = {"latitude": 53.3, "longitude": -6.3, "agent_url": "http://127.0.0.1:7101"}

    answer = httpx.put(f"{control}/v1/regions/eu-west", json=body, timeout=10)

    assert answer.status_code == 200
    assert answer.json()["agent_url"] == "http://127.0.0.1:7101"
