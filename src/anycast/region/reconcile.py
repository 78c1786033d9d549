"""Pure decisions of a region agent: which replicas should run, what to change, when to retry.

Nothing here touches processes, files or the network, so every rule is unit-tested alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from anycast.control.rollout import artifacts_for_region


@dataclass(frozen=True)
class Desired:
    """One replica the control plane wants in this region."""

    replica_id: str
    deployment: str
    artifact_id: str


def replica_id(deployment: str, region: str, index: int) -> str:
    """The id of replica slot ``index``; an agent gives a new replica the lowest free one."""
    return f"{deployment}-{region}-{index}"


def desired_for_region(deployments: Iterable[Mapping[str, Any]], region: str) -> list[Desired]:
    """The replicas every deployment asks of ``region``, in a stable order, as numbered slots."""
    wanted = []
    for deployment in sorted(deployments, key=lambda d: str(d.get("name", ""))):
        name, artifact = deployment.get("name"), deployment.get("artifact")
        if not isinstance(name, str) or not isinstance(artifact, str):
            continue
        slots = [a for a, n in artifacts_for_region(deployment, region).items() for _ in range(n)]
        for index, slot_artifact in enumerate(slots):
            wanted.append(Desired(replica_id(name, region, index), name, slot_artifact))
    return wanted


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


# -- replacing replicas with a surge ----------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """One replica an agent runs (not counting those already stopping)."""

    replica_id: str
    deployment: str
    artifact_id: str
    ready: bool


@dataclass
class Steps:
    """What an agent does this tick: start these replicas, stop those."""

    start: list[Desired] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.start or self.stop)


def plan_region(
    region: str,
    wanted: Mapping[str, Mapping[str, int]],
    observed: Iterable[Observed],
    banned: Mapping[str, Iterable[str]],
    taken: Iterable[str] = (),
    max_surge: int = 1,
) -> Steps:
    """Move ``observed`` towards ``wanted`` (deployment -> artifact -> count) without downtime.

    A replacement starts a new replica in an extra slot first (at most ``max_surge`` not
    yet ready per deployment) and stops an old one only once the ready replicas exceed
    the wanted count. Old replicas that are not ready stop at once. When nothing of a
    deployment is ready, or it runs a ``banned`` (rolled-back) artifact, every missing
    replica starts at once; banned ones stop as soon as one good replica is ready.
    ``taken`` are ids still in use (stopping replicas too), never given to a new one.
    """
    by_deployment: dict[str, list[Observed]] = {}
    for replica in sorted(observed, key=lambda o: o.replica_id):
        by_deployment.setdefault(replica.deployment, []).append(replica)
    used = set(taken) | {o.replica_id for group in by_deployment.values() for o in group}

    steps = Steps()
    for deployment in sorted(set(wanted) | set(by_deployment)):
        counts = {a: n for a, n in (wanted.get(deployment) or {}).items() if n > 0}
        bad = set(banned.get(deployment, ()))
        part = _plan_deployment(counts, by_deployment.get(deployment, []), bad, max_surge)
        steps.stop.extend(part.stop)
        for artifact in part.start_artifacts:
            rid = _fresh_id(deployment, region, used)
            used.add(rid)
            steps.start.append(Desired(rid, deployment, artifact))
    return steps


@dataclass
class _DeploymentSteps:
    start_artifacts: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)


def _plan_deployment(
    counts: Mapping[str, int], running: list[Observed], banned: set[str], max_surge: int
) -> _DeploymentSteps:
    keep: list[Observed] = []
    for artifact, count in counts.items():
        mine = [o for o in running if o.artifact_id == artifact]
        keep.extend(sorted(mine, key=lambda o: not o.ready)[:count])
    kept = {o.replica_id for o in keep}
    old = [o for o in running if o.replica_id not in kept]
    bad = [o for o in old if o.artifact_id in banned]
    old_good = [o for o in old if o.artifact_id not in banned]
    ready_keep = sum(o.ready for o in keep)
    ready_good = ready_keep + sum(o.ready for o in old_good)
    steps = _DeploymentSteps()

    missing: list[str] = []
    for artifact, count in counts.items():
        have = sum(1 for o in keep if o.artifact_id == artifact)
        missing.extend([artifact] * (count - have))
    urgent = not old or ready_good == 0 or bool(bad)
    budget = len(missing) if urgent else max(0, max_surge - (len(keep) - ready_keep))
    steps.start_artifacts = missing[:budget]

    if ready_good > 0:
        steps.stop.extend(o.replica_id for o in bad)
    steps.stop.extend(o.replica_id for o in old_good if not o.ready)
    surplus = ready_good - sum(counts.values())
    steps.stop.extend([o.replica_id for o in old_good if o.ready][: max(0, surplus)])
    return steps


def _fresh_id(deployment: str, region: str, used: set[str]) -> str:
    index = 0
    while replica_id(deployment, region, index) in used:
        index += 1
    return replica_id(deployment, region, index)


def banned_artifacts(deployments: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Each deployment's rolled-back artifacts, which must never serve it again."""
    return {
        str(d.get("name")): [str(a) for a in d.get("rolled_back") or []]
        for d in deployments
        if d.get("rolled_back")
    }


def wanted_for_region(
    deployments: Iterable[Mapping[str, Any]], region: str
) -> dict[str, dict[str, int]]:
    """deployment -> artifact -> count for ``region``, rollouts taken into account."""
    return {
        str(d["name"]): artifacts_for_region(d, region)
        for d in deployments
        if isinstance(d.get("name"), str) and isinstance(d.get("artifact"), str)
    }
