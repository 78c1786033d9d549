"""What the gateway learns from an artifact: the handler declarations `anycast build` writes."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from anycast.core.config import DEFAULT_REGIONS
from anycast.gateway import HandlerPolicy, RoutingTable
from anycast.registry import MANIFEST, build_artifact

SERVICE = """
from pydantic import BaseModel

import anycast


class Number(BaseModel):
    value: int


class Shop(anycast.Service):
    @anycast.handler
    def predict(self, request: Number) -> Number:
        return request

    @anycast.handler(deterministic=True)
    def square(self, request: Number) -> Number:
        return Number(value=request.value**2)

    @anycast.handler(idempotent=False)
    def charge(self, request: Number) -> Number:
        return request
"""


def _manifest(tar_path: Path) -> dict:
    with tarfile.open(tar_path) as tar:
        return json.load(tar.extractfile(MANIFEST))  # type: ignore[arg-type]


def test_build_declares_each_handlers_retry_and_cache_policy(tmp_path: Path) -> None:
    (tmp_path / "svc").mkdir()
    (tmp_path / "svc" / "service.py").write_text(SERVICE)
    artifact_id, tar_path = build_artifact(
        f"{tmp_path / 'svc' / 'service.py'}:Shop", name="shop", version="1", out_dir=tmp_path
    )
    manifest = _manifest(tar_path)

    assert manifest["handlers"] == {
        "charge": {"idempotent": False, "deterministic": False},
        "predict": {"idempotent": True, "deterministic": False},
        "square": {"idempotent": True, "deterministic": True},
    }
    state = {
        "revision": 1,
        "artifacts": [{"id": artifact_id, "manifest": manifest}],
        "deployments": [{"name": "shop", "artifact": artifact_id}],
        "replicas": [],
    }
    table = RoutingTable.from_state(state, DEFAULT_REGIONS)
    assert table.policy("shop", "charge") == HandlerPolicy(idempotent=False)
    assert table.policy("shop", "square") == HandlerPolicy(deterministic=True)


def test_a_file_that_is_not_a_service_is_packed_without_declarations(tmp_path: Path) -> None:
    (tmp_path / "svc").mkdir()
    (tmp_path / "svc" / "service.py").write_text("class Echo:\n    pass\n")
    artifact_id, tar_path = build_artifact(
        f"{tmp_path / 'svc' / 'service.py'}:Echo", name="echo", version="1", out_dir=tmp_path
    )

    assert "handlers" not in _manifest(tar_path)
    state = {
        "revision": 1,
        "artifacts": [{"id": artifact_id, "manifest": _manifest(tar_path)}],
        "deployments": [{"name": "echo", "artifact": artifact_id}],
        "replicas": [],
    }
    assert RoutingTable.from_state(state).policy("echo", "x") == HandlerPolicy(idempotent=True)
