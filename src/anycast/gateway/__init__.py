"""The global gateway: one endpoint, nearest healthy region, least-loaded replica, retry."""

from anycast.gateway.routing import ReplicaHealth, Route, RoutingTable, pick_replica
from anycast.gateway.server import Gateway, create_gateway_app

__all__ = [
    "Gateway",
    "ReplicaHealth",
    "Route",
    "RoutingTable",
    "create_gateway_app",
    "pick_replica",
]
