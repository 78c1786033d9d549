"""Autoscaling policies of deployments: validation, lookup per region, effective counts.

A deployment's ``autoscaling`` maps a region name, or ``"*"`` for every region, to a
policy. Pure functions over plain dicts, shared by the control plane (validation, rollouts),
region agents (which decide the counts) and the gateway (which wakes regions at zero).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from anycast.core.errors import InvalidInput
from anycast.core.names import check_name

ALL_REGIONS = "*"
MAX_REPLICAS = 64
MAX_DELAY_SECONDS = 3600.0
MAX_IDLE_SECONDS = 86400.0
MAX_TARGET_IN_FLIGHT = 10000.0

# Defaults of the fields a policy may leave out; max_replicas is always required.
DEFAULTS: dict[str, float | int] = {
    "min_replicas": 1,
    "target_in_flight": 4.0,
    "scale_up_delay": 5.0,
    "scale_down_delay": 60.0,
    "idle_to_zero": 300.0,
}
FIELDS = ("min_replicas", "max_replicas", *list(DEFAULTS)[1:])
# The CLI flag that sets each field, named in error messages.
FLAGS = {
    "min_replicas": "--min-replicas",
    "max_replicas": "--max-replicas",
    "target_in_flight": "--target-in-flight",
    "scale_up_delay": "--scale-up-delay",
    "scale_down_delay": "--scale-down-delay",
    "idle_to_zero": "--idle-to-zero",
}


def check_autoscaling(value: object, known_regions: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Validate ``{"*" | region: policy}``; each policy comes back with every field filled in."""
    if not isinstance(value, Mapping):
        raise InvalidInput(
            'autoscaling must be an object of {"region" or "*": policy}, '
            'e.g. {"*": {"min_replicas": 0, "max_replicas": 4}}'
        )
    known = sorted(known_regions)
    policies: dict[str, dict[str, Any]] = {}
    for region, policy in value.items():
        if region != ALL_REGIONS:
            check_name(region, "region name")
            if region not in known:
                listed = ", ".join(known) or "none registered yet"
                raise InvalidInput(
                    f"unknown region {region!r} in autoscaling; known regions: {listed} "
                    '(or "*" for every region)'
                )
        policies[str(region)] = check_policy(policy, str(region))
    return policies


def check_policy(policy: object, scope: str = ALL_REGIONS) -> dict[str, Any]:
    """One policy with defaults applied; a clear message for every rule it breaks."""
    where = "every region" if scope == ALL_REGIONS else f"region {scope}"
    if not isinstance(policy, Mapping):
        raise InvalidInput(f"the autoscaling policy of {where} must be an object")
    unknown = sorted(set(policy) - set(FIELDS))
    if unknown:
        raise InvalidInput(
            f"unknown autoscaling field {unknown[0]!r} ({where}); allowed: {', '.join(FIELDS)}"
        )
    if "max_replicas" not in policy:
        raise InvalidInput(f"autoscaling of {where} needs max_replicas (set --max-replicas)")
    merged = {**DEFAULTS, **policy}
    low = _count(merged["min_replicas"], "min_replicas", 0, where)
    high = _count(merged["max_replicas"], "max_replicas", 1, where)
    if low > high:
        raise InvalidInput(
            f"min_replicas {low} is more than max_replicas {high} ({where}); "
            "set --min-replicas at most --max-replicas"
        )
    return {
        "min_replicas": low,
        "max_replicas": high,
        "target_in_flight": _number(
            merged["target_in_flight"], "target_in_flight", MAX_TARGET_IN_FLIGHT, where, zero=False
        ),
        "scale_up_delay": _number(
            merged["scale_up_delay"], "scale_up_delay", MAX_DELAY_SECONDS, where
        ),
        "scale_down_delay": _number(
            merged["scale_down_delay"], "scale_down_delay", MAX_DELAY_SECONDS, where
        ),
        "idle_to_zero": _number(
            merged["idle_to_zero"], "idle_to_zero", MAX_IDLE_SECONDS, where, zero=False
        ),
    }


def _count(value: object, field: str, lowest: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= MAX_REPLICAS:
        raise InvalidInput(
            f"{field} must be an integer from {lowest} to {MAX_REPLICAS}, got {value!r} "
            f"({where}; set {FLAGS[field]})"
        )
    return value


def _number(value: object, field: str, highest: float, where: str, *, zero: bool = True) -> float:
    rule = "from 0" if zero else "more than 0 and"
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else -1
    low_ok = number >= 0 if zero else number > 0
    if not (low_ok and number <= highest):
        raise InvalidInput(
            f"{field} must be a number {rule} up to {highest:g}, got {value!r} "
            f"({where}; set {FLAGS[field]})"
        )
    return number


def policy_for(deployment: Mapping[str, Any], region: str) -> dict[str, Any] | None:
    """The policy that applies to ``region``: its own, else the one for every region."""
    policies = deployment.get("autoscaling") or {}
    if not isinstance(policies, Mapping):
        return None
    found = policies.get(region, policies.get(ALL_REGIONS))
    return dict(found) if isinstance(found, Mapping) else None


def clamp(count: int, policy: Mapping[str, Any]) -> int:
    """``count`` kept within the policy's min..max."""
    return max(int(policy["min_replicas"]), min(int(policy["max_replicas"]), int(count)))


def reports_by_region(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """``/v1/state``'s ``autoscaling`` rows as region -> deployment -> desired count."""
    found: dict[str, dict[str, int]] = {}
    for row in rows:
        try:
            found.setdefault(str(row["region"]), {})[str(row["deployment"])] = int(row["desired"])
        except (KeyError, TypeError, ValueError):
            continue
    return found


def effective_counts(
    deployment: Mapping[str, Any], reports: Mapping[str, Mapping[str, int]]
) -> dict[str, int]:
    """Replicas per region as they are meant to be now: fixed counts, or the agent's choice.

    In a region with a policy the count its agent reported wins; before the first report
    the deployment's count for that region, kept within the policy's min..max, stands.
    """
    name = str(deployment.get("name", ""))
    counts = {str(r): int(n) for r, n in (deployment.get("replicas") or {}).items()}
    regions = set(counts) | {r for r, mine in reports.items() if name in mine}
    result: dict[str, int] = {}
    for region in sorted(regions):
        policy = policy_for(deployment, region)
        if policy is None:
            result[region] = counts.get(region, 0)
        elif name in reports.get(region, {}):
            result[region] = clamp(reports[region][name], policy)
        else:
            result[region] = clamp(counts.get(region, 0), policy)
    return result


def with_counts(deployment: Mapping[str, Any], counts: Mapping[str, int]) -> dict[str, Any]:
    """A copy of ``deployment`` wanting ``counts``, for the rollout rules to work on."""
    return {**deployment, "replicas": dict(counts)}


def describe(policy: Mapping[str, Any]) -> str:
    """A policy in one line: ``0-4 replicas, 4 in flight each, up 2s, down 30s, zero 60s``."""
    text = (
        f"{policy['min_replicas']}-{policy['max_replicas']} replicas, "
        f"{policy['target_in_flight']:g} in flight each, up {policy['scale_up_delay']:g}s, "
        f"down {policy['scale_down_delay']:g}s"
    )
    if int(policy["min_replicas"]) == 0:
        text += f", zero after {policy['idle_to_zero']:g}s idle"
    return text
