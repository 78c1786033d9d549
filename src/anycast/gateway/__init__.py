"""The global gateway: one endpoint, nearest healthy region, least-loaded replica, retry."""

from anycast.gateway.cache import ResponseCache
from anycast.gateway.routing import (
    HandlerPolicy,
    ReplicaHealth,
    RetryBudget,
    Route,
    RoutingTable,
    pick_replica,
)
from anycast.gateway.server import Gateway, create_gateway_app, serve_gateway

__all__ = [
    "Gateway",
    "HandlerPolicy",
    "ReplicaHealth",
    "ResponseCache",
    "RetryBudget",
    "Route",
    "RoutingTable",
    "create_gateway_app",
    "pick_replica",
    "serve_gateway",
]
