"""The local cluster: every role as a background process on this machine."""

from anycast.local.cluster import LocalCluster

__all__ = ["LocalCluster"]
