"""Estimated network round-trip time between regions from their coordinates."""

from __future__ import annotations

import math

EARTH_RADIUS_KM = 6371.0
# Light in fibre covers about 200 km per millisecond; real routes are longer than
# the great circle, so the path is stretched by a typical factor.
FIBRE_KM_PER_MS = 200.0
ROUTE_STRETCH = 1.4


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance by the haversine formula."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def estimated_rtt_ms(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Round trip over fibre along a stretched great circle, in milliseconds."""
    one_way = distance_km(lat1, lon1, lat2, lon2) * ROUTE_STRETCH / FIBRE_KM_PER_MS
    return 2 * one_way
