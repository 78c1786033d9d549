"""A typed client for the control-plane API; errors come back as Anycast exceptions."""

from __future__ import annotations

from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from anycast.core.errors import Unavailable
from anycast.core.http import check, client


class ControlClient:
    """Calls ``anycast control`` at ``url``. Thread-safe; close it (or use ``with``) when done."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = client(self.url, timeout=timeout)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise Unavailable(f"control plane at {self.url} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"control plane at {self.url} is unreachable: {exc}") from exc
        return check(response)

    def health(self) -> bool:
        """True if the control plane answers its health check."""
        try:
            return bool(self._call("GET", "/healthz", timeout=min(self.timeout, 2.0)))
        except Exception:
            return False

    def state(self, after: int = 0, wait: float = 0) -> dict[str, Any]:
        """Everything, once the store revision exceeds ``after`` or ``wait`` seconds pass."""
        params = {"after": after, "wait": wait}
        result: dict[str, Any] = self._call(
            "GET", "/v1/state", params=params, timeout=self.timeout + wait
        )
        return result

    def register_region(
        self, name: str, latitude: float, longitude: float, agent_url: str
    ) -> dict[str, Any]:
        body = {"latitude": latitude, "longitude": longitude, "agent_url": agent_url}
        result: dict[str, Any] = self._call("PUT", f"/v1/regions/{_seg(name)}", json=body)
        return result

    def regions(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/regions")
        return result

    def register_artifact(
        self, id: str, name: str, version: str, manifest: dict[str, Any]
    ) -> dict[str, Any]:
        body = {"id": id, "name": name, "version": version, "manifest": manifest}
        result: dict[str, Any] = self._call("POST", "/v1/artifacts", json=body)
        return result

    def artifacts(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/artifacts")
        return result

    def artifact(self, id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/artifacts/{_seg(id)}")
        return result

    def put_deployment(
        self,
        name: str,
        artifact: str,
        replicas: dict[str, int],
        revision: int | None = None,
        *,
        canary_percent: int | None = None,
        allow_rolled_back: bool = False,
        autoscaling: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create or update; with ``revision`` only if unchanged since (else Conflict).

        A new artifact rolls out region by region; with ``canary_percent`` it first runs on
        that share of every region's replicas until :meth:`promote`. ``autoscaling``
        (``{"*" or region: policy}``) replaces the policies; ``{}`` removes them, None keeps them.
        """
        body: dict[str, Any] = {"artifact": artifact, "replicas": replicas}
        if autoscaling is not None:
            body["autoscaling"] = autoscaling
        if revision is not None:
            body["revision"] = revision
        if canary_percent is not None:
            body["canary_percent"] = canary_percent
        if allow_rolled_back:
            body["allow_rolled_back"] = True
        result: dict[str, Any] = self._call("PUT", f"/v1/deployments/{_seg(name)}", json=body)
        return result

    def promote(self, name: str, revision: int | None = None) -> dict[str, Any]:
        """Roll a canary out to every replica, region by region."""
        body = {} if revision is None else {"revision": revision}
        path = f"/v1/deployments/{_seg(name)}/promote"
        result: dict[str, Any] = self._call("POST", path, json=body)
        return result

    def rollback(self, name: str, revision: int | None = None) -> dict[str, Any]:
        """Go back to the previous artifact; the current one never serves ``name`` again."""
        body = {} if revision is None else {"revision": revision}
        path = f"/v1/deployments/{_seg(name)}/rollback"
        result: dict[str, Any] = self._call("POST", path, json=body)
        return result

    def deployments(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/deployments")
        return result

    def deployment(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/deployments/{_seg(name)}")
        return result

    def scale(self, name: str) -> dict[str, Any]:
        """Per region: fixed or autoscaled, the count wanted and the replicas observed."""
        result: dict[str, Any] = self._call("GET", f"/v1/deployments/{_seg(name)}/scale")
        return result

    def delete_deployment(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/v1/deployments/{_seg(name)}")
        return result

    def report_replicas(
        self,
        region: str,
        replicas: list[dict[str, Any]],
        autoscaling: list[dict[str, Any]] | None = None,
    ) -> None:
        """Send the region's full observed replica set (replaces the previous one).

        ``autoscaling`` holds the agent's count of each deployment it autoscales there.
        """
        body: dict[str, Any] = {"replicas": replicas}
        if autoscaling is not None:
            body["autoscaling"] = autoscaling
        self._call("PUT", f"/v1/regions/{_seg(region)}/replicas", json=body)

    def replicas(
        self, region: str | None = None, deployment: str | None = None
    ) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("region", region), ("deployment", deployment)) if v}
        result: list[dict[str, Any]] = self._call("GET", "/v1/replicas", params=params)
        return result


def _seg(value: str) -> str:
    """One URL path segment; a '/' in a name reaches the server as a bad name, not a route."""
    return quote(value, safe="")
