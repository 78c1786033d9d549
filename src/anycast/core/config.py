"""Cluster configuration: where each role listens, where state lives, where regions are.

A local cluster keeps everything under one home folder (``.anycast`` in the working
directory unless ``ANYCAST_HOME`` says otherwise)::

    .anycast/
      cluster.yaml          this configuration
      control/state.db      control-plane store (SQLite)
      registry/             artifact registry (local storage)
      regions/<name>/       each region's own data: pulled artifacts, replica logs
      logs/, run/           logs and pid files of the processes `anycast up` started
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from anycast.core.errors import ConfigError
from anycast.core.geo import estimated_rtt_ms
from anycast.core.names import check_name

DEFAULT_CONTROL_PORT = 7070
DEFAULT_GATEWAY_PORT = 8080
DEFAULT_AGENT_PORT = 7100


class RegionConfig(BaseModel):
    name: str
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return check_name(value, "region name")


DEFAULT_REGIONS = [
    RegionConfig(name="us-east", latitude=38.9, longitude=-77.4),
    RegionConfig(name="eu-west", latitude=53.3, longitude=-6.3),
    RegionConfig(name="ap-southeast", latitude=1.35, longitude=103.8),
]


class ClusterConfig(BaseModel):
    home: Path = Path(".anycast")
    host: str = "127.0.0.1"
    control_port: int = DEFAULT_CONTROL_PORT
    gateway_port: int = DEFAULT_GATEWAY_PORT
    agent_port_base: int = DEFAULT_AGENT_PORT
    gateway_region: str = "us-east"
    simulate_latency: bool = True
    # "haproxy": HAProxy carries the gateway's calls, steered by it (anycast.gateway.haproxy).
    gateway_data_plane: Literal["python", "haproxy"] = "python"
    regions: list[RegionConfig] = Field(default_factory=lambda: list(DEFAULT_REGIONS))

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self.control_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def control_db(self) -> Path:
        return self.home / "control" / "state.db"

    def region_dir(self, name: str) -> Path:
        return self.home / "regions" / check_name(name, "region name")

    def agent_port(self, name: str) -> int:
        return self.agent_port_base + [r.name for r in self.regions].index(name)

    def region(self, name: str) -> RegionConfig:
        for region in self.regions:
            if region.name == name:
                return region
        known = ", ".join(r.name for r in self.regions)
        raise ConfigError(f"unknown region {name!r}; the cluster has: {known}")

    def rtt_ms(self, a: str, b: str) -> float:
        """Estimated round trip between two regions of this cluster."""
        if a == b:
            return 0.0
        ra, rb = self.region(a), self.region(b)
        return estimated_rtt_ms(ra.latitude, ra.longitude, rb.latitude, rb.longitude)

    def save(self, path: Path | None = None) -> Path:
        path = path or self.home / "cluster.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.model_dump(mode="json")
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


def default_home() -> Path:
    return Path(os.environ.get("ANYCAST_HOME", ".anycast"))


def load_config(home: Path | None = None) -> ClusterConfig:
    """Read ``<home>/cluster.yaml``, or return the defaults rooted at ``home``."""
    home = home or default_home()
    path = home / "cluster.yaml"
    if not path.exists():
        return ClusterConfig(home=home)
    try:
        data = yaml.safe_load(path.read_text()) or {}
        data["home"] = str(home)
        return ClusterConfig.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{path} is not a valid cluster configuration: {exc}") from exc
