"""The region agent: runs each deployment's replicas in one region, as the control plane asks."""

from anycast.region.agent import RegionAgent, create_agent_app
from anycast.region.engine import ProcessEngine, ReplicaEngine, ReplicaHandle, ReplicaSpec

__all__ = [
    "ProcessEngine",
    "RegionAgent",
    "ReplicaEngine",
    "ReplicaHandle",
    "ReplicaSpec",
    "create_agent_app",
]
