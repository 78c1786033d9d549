"""Pure decisions of a region agent: which replicas should run, what to change, when to retry.

Nothing here touches processes, files or the network, so every rule is unit-tested alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Desired:
    """One replica the control plane wants in this region."""

    replica_id: str
    deployment: str
    artifact_id: str


def replica_id(deployment: str, region: str, index: int) -> str:
    """Stable replica ids: the same deployment, region and slot always get the same id."""
    return f"{deployment}-{region}-{index}"


def desired_for_region(deployments: Iterable[Mapping[str, Any]], region: str) -> list[Desired]:
    """The replicas every deployment asks of ``region``, in a stable order."""
    wanted = []
    for deployment in sorted(deployments, key=lambda d: str(d.get("name", ""))):
        name, artifact = deployment.get("name"), deployment.get("artifact")
        count = (deployment.get("replicas") or {}).get(region, 0)
        if not isinstance(name, str) or not isinstance(artifact, str):
            continue
        for index in range(max(0, int(count))):
            wanted.append(Desired(replica_id(name, region, index), name, artifact))
    return wanted


@dataclass
class Plan:
    """What to change so observed matches desired."""

    start: list[Desired] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    # Same slot, new artifact: the old replica is stopped and a new one started in its place.
    replace: list[Desired] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.start or self.stop or self.replace)


def plan(desired: Iterable[Desired], observed: Mapping[str, str]) -> Plan:
    """Diff desired replicas against ``observed`` (replica id -> artifact id it runs)."""
    result = Plan()
    wanted = {d.replica_id: d for d in desired}
    for rid, want in wanted.items():
        have = observed.get(rid)
        if have is None:
            result.start.append(want)
        elif have != want.artifact_id:
            result.replace.append(want)
    result.stop = sorted(rid for rid in observed if rid not in wanted)
    return result


def rolling_replacements(
    replace: Iterable[Desired],
    ready: Mapping[str, int],
    unready: Mapping[str, int],
    max_unavailable: int = 1,
) -> list[Desired]:
    """Pick which replacements may happen now without taking a deployment down.

    ``ready`` and ``unready`` count each deployment's replicas in this region. At most
    ``max_unavailable`` may be not ready at once, unless none is ready anyway (a single
    replica, or a crash loop being fixed by a new artifact): then all are replaced.
    """
    by_deployment: dict[str, list[Desired]] = {}
    for want in replace:
        by_deployment.setdefault(want.deployment, []).append(want)

    chosen = []
    for deployment, wants in by_deployment.items():
        if ready.get(deployment, 0) == 0:
            chosen.extend(wants)
            continue
        budget = max(0, max_unavailable - unready.get(deployment, 0))
        chosen.extend(wants[:budget])
    return chosen


@dataclass
class Backoff:
    """Exponential restart delay: ``initial`` doubling up to ``maximum``.

    The count resets once a replica has stayed ready for ``reset_after`` seconds, so a
    replica that crashes once a day restarts at once, and a crash loop slows down.
    """

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    reset_after: float = 10.0
    failures: int = 0

    def delay(self) -> float:
        if self.failures == 0:
            return 0.0
        return min(self.maximum, self.initial * self.factor ** (self.failures - 1))

    def record_failure(self) -> float:
        """Count one more failure and return how long to wait before the next start."""
        self.failures += 1
        return self.delay()

    def record_ready(self, ready_for: float) -> None:
        if ready_for >= self.reset_after:
            self.failures = 0
