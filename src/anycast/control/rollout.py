"""Rollout decisions: which artifact each region runs during a rolling update or a canary.

Pure functions over plain deployment and replica dicts (no store, no network), shared by
the control plane (which advances a rollout) and region agents (which follow it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

ROLLING = "rolling"
CANARY = "canary"
COMPLETE = "complete"
ROLLED_BACK = "rolled-back"
ACTIVE_ROLLOUTS = (ROLLING, CANARY)


def canary_count(count: int, percent: int) -> int:
    """Replicas of ``count`` that run the canary: ``percent`` rounded up, at least one."""
    if count <= 0:
        return 0
    return min(count, max(1, math.ceil(count * percent / 100)))


def rollout_order(replicas: Mapping[str, Any]) -> list[str]:
    """The regions a rollout goes through, one at a time: those with replicas, by name."""
    return sorted(region for region, count in replicas.items() if int(count) > 0)


def artifacts_for_region(deployment: Mapping[str, Any], region: str) -> dict[str, int]:
    """How many replicas of each artifact ``deployment`` wants in ``region`` right now.

    Without an active rollout every replica runs ``artifact``. A canary runs it on
    :func:`canary_count` replicas of every region and the rollout's ``from`` artifact on
    the rest; a rolling update runs it only in the regions it has reached (done or
    current), the others keep what they ran before (the canary split after a promote).
    """
    count = max(0, int((deployment.get("replicas") or {}).get(region, 0)))
    target = str(deployment.get("artifact", ""))
    rollout = deployment.get("rollout") or {}
    state, previous = rollout.get("state"), rollout.get("from")
    if count == 0:
        return {}
    if state not in ACTIVE_ROLLOUTS or not previous or previous == target:
        return {target: count}
    if state == ROLLING and (region in rollout.get("done", []) or region == rollout.get("current")):
        return {target: count}
    percent = rollout.get("canary_percent")
    canaries = canary_count(count, int(percent)) if percent else 0
    wanted = {target: canaries, str(previous): count - canaries}
    return {artifact: n for artifact, n in wanted.items() if n > 0}


def region_rolled(
    deployment: str, artifact: str, count: int, replicas: Iterable[Mapping[str, Any]]
) -> bool:
    """Whether a region's observed ``replicas`` include ``count`` ready ones of ``artifact``."""
    ready = sum(
        1
        for r in replicas
        if r.get("deployment") == deployment
        and r.get("artifact") == artifact
        and r.get("state") == "ready"
    )
    return ready >= count


def advance(
    rollout: Mapping[str, Any],
    deployment: Mapping[str, Any],
    observed: Mapping[str, list[Mapping[str, Any]]],
) -> dict[str, Any]:
    """The rolling update after marking done every region, in order, whose replicas are ready.

    ``observed`` holds each region's reported replicas. The rollout moves on to the next
    region only once the current one has all its replicas ready on the new artifact, and
    is ``complete`` once every region is done.
    """
    result = dict(rollout)
    if result.get("state") != ROLLING:
        return result
    name, target = str(deployment.get("name")), str(deployment.get("artifact"))
    counts = deployment.get("replicas") or {}
    order = rollout_order(counts)
    done = [region for region in result.get("done", []) if region in order]
    current = None
    for region in order:
        if region in done:
            continue
        if not region_rolled(name, target, int(counts[region]), observed.get(region, [])):
            current = region
            break
        done.append(region)
    result.update(regions=order, done=done, current=current)
    if current is None:
        result["state"] = COMPLETE
    return result
