"""The control plane's objects and rules, over any :class:`Store`.

Kinds kept in the store: ``regions`` (registered agents), ``artifacts`` (pushed builds),
``deployments`` (desired replicas per region, with their rollout, artifact history and
rolled-back artifacts) and ``replicas`` (each region's last observed set, one object per
region). Every object read back carries its ``revision``. Rollouts advance here, as
regions report ready replicas; the decisions themselves are in :mod:`anycast.control.rollout`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from anycast.control.rollout import (
    ACTIVE_ROLLOUTS,
    CANARY,
    ROLLED_BACK,
    ROLLING,
    advance,
    rollout_order,
)
from anycast.control.scaling import (
    check_autoscaling,
    effective_counts,
    policy_for,
    reports_by_region,
    with_counts,
)
from anycast.control.store import Record, Store
from anycast.core.config import RegionConfig
from anycast.core.errors import Conflict, IntegrityError, InvalidInput, NotFound
from anycast.core.names import check_artifact_id, check_name
from anycast.registry.artifact import manifest_id
from anycast.registry.registry import check_manifest

log = logging.getLogger(__name__)

REGIONS = "regions"
ARTIFACTS = "artifacts"
DEPLOYMENTS = "deployments"
REPLICAS = "replicas"

MAX_REPLICAS = 64
# crash-loop: failed again and again without staying ready; restarted with backoff.
REPLICA_STATES = ("crash-loop", "starting", "ready", "failed", "stopping")
HISTORY_LIMIT = 20
ROLLOUT_RETRIES = 5
MIN_ID_PREFIX = 8
PUSH_HINT = (
    "build it with `anycast build SERVICE --name N --version V`, "
    "then register it with `anycast push dist/N-V.tar`"
)
_HEX = re.compile(r"^[0-9a-f]+$")


class _Keep:
    """The ``autoscaling`` argument that leaves a deployment's policies as they are."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()


def _out(record: Record) -> dict[str, Any]:
    return {**record.value, "revision": record.revision}


def check_replica_counts(replicas: object, known_regions: Iterable[str]) -> dict[str, int]:
    """Validate {region: count}: known region names, integer counts in 0..MAX_REPLICAS."""
    if not isinstance(replicas, dict):
        raise InvalidInput('replicas must be an object of {"region": count}, e.g. {"us-east": 2}')
    known = sorted(known_regions)
    counts: dict[str, int] = {}
    for region, count in replicas.items():
        check_name(region, "region name")
        if region not in known:
            listed = ", ".join(known) or "none registered yet"
            raise InvalidInput(f"unknown region {region!r} in replicas; known regions: {listed}")
        if isinstance(count, bool) or not isinstance(count, int):
            raise InvalidInput(
                f"replicas for {region} must be an integer from 0 to {MAX_REPLICAS}, got {count!r}"
            )
        if not 0 <= count <= MAX_REPLICAS:
            raise InvalidInput(
                f"replicas must be between 0 and {MAX_REPLICAS}, got {count} (region {region})"
            )
        counts[region] = count
    return counts


class ControlPlane:
    """Desired state (regions, artifacts, deployments) and observed state (replicas)."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        # The cluster config's regions once seeded; agents may register only these.
        self.configured_regions: list[str] | None = None

    def _now(self) -> float:
        return round(self.clock(), 3)

    # Regions

    def seed_regions(self, regions: Iterable[RegionConfig]) -> None:
        """Make sure every region of the cluster config exists, keeping agent details.

        From then on only these regions may register (see :meth:`register_region`).
        """
        regions = list(regions)
        self.configured_regions = sorted(r.name for r in regions)
        for region in regions:
            existing = self.store.get(REGIONS, region.name)
            value: dict[str, Any] = {"agent_url": None, "last_seen": None}
            if existing:
                value = dict(existing.value)
            coords = {"latitude": region.latitude, "longitude": region.longitude}
            if existing and all(value.get(k) == v for k, v in coords.items()):
                continue
            value.update(coords, name=region.name)
            self.store.put(REGIONS, region.name, value)

    def register_region(
        self, name: str, latitude: float, longitude: float, agent_url: str | None
    ) -> dict[str, Any]:
        check_name(name, "region name")
        self._check_configured(name)
        value = {
            "name": name,
            "latitude": latitude,
            "longitude": longitude,
            "agent_url": agent_url,
            "last_seen": self._now(),
        }
        record = self.store.put(REGIONS, name, value)
        log.debug("region %s registered agent_url=%s", name, agent_url)
        return _out(record)

    def _check_configured(self, name: str) -> None:
        configured = self.configured_regions
        if configured is None or name in configured:
            return
        raise InvalidInput(
            f"region {name!r} is not in the cluster's configuration; configured regions: "
            f"{', '.join(configured) or 'none'}. To add a region, add it (name, latitude, "
            "longitude) to the regions list in the cluster's cluster.yaml and restart the "
            "control plane",
            code="unknown_region",
        )

    def regions(self) -> list[dict[str, Any]]:
        return [_out(r) for r in self.store.list(REGIONS)]

    def region(self, name: str) -> dict[str, Any]:
        record = self.store.get(REGIONS, check_name(name, "region name"))
        if record is None:
            known = ", ".join(r.key for r in self.store.list(REGIONS)) or "none"
            raise NotFound(f"unknown region {name!r}; known regions: {known}")
        return _out(record)

    # Artifacts

    def register_artifact(
        self, artifact_id: str, name: str, version: str, manifest: dict[str, Any]
    ) -> dict[str, Any]:
        """Record a pushed artifact; the same id again is a no-op, a reused version a 409."""
        check_artifact_id(artifact_id)
        check_manifest(manifest)
        actual = manifest_id(manifest)
        if actual != artifact_id:
            raise IntegrityError(f"manifest hashes to {actual}, not the artifact id {artifact_id}")
        if (name, version) != (manifest["name"], manifest["version"]):
            raise InvalidInput(
                f"name and version {name}:{version} differ from the manifest's "
                f"{manifest['name']}:{manifest['version']}"
            )

        existing = self.store.get(ARTIFACTS, artifact_id)
        if existing:
            return _out(existing)
        self._check_version_unused(name, version, artifact_id)
        value = {
            "id": artifact_id,
            "name": name,
            "version": version,
            "manifest": manifest,
            "created_at": self._now(),
        }
        try:
            record = self.store.put(ARTIFACTS, artifact_id, value, expected_revision=0)
        except Conflict:
            raced = self.store.get(ARTIFACTS, artifact_id)
            if raced is None:
                raise
            return _out(raced)
        log.info("artifact %s:%s registered id=%s", name, version, artifact_id[:12])
        return _out(record)

    def _check_version_unused(self, name: str, version: str, artifact_id: str) -> None:
        for other in self.store.list(ARTIFACTS):
            if (other.value.get("name"), other.value.get("version")) == (name, version):
                raise Conflict(
                    f"{name}:{version} is already artifact {other.key[:12]}, not "
                    f"{artifact_id[:12]}; versions are immutable, so push a new --version",
                    code="immutable_version",
                )

    def artifacts(self) -> list[dict[str, Any]]:
        return [_out(r) for r in self.store.list(ARTIFACTS)]

    def artifact(self, ref: str) -> dict[str, Any]:
        record = self.store.get(ARTIFACTS, self.resolve_artifact(ref))
        if record is None:
            raise NotFound(f"unknown artifact {ref!r}; {PUSH_HINT}")
        return _out(record)

    def resolve_artifact(self, ref: str) -> str:
        """A registered artifact's id from its id, a unique 8+ digit prefix or name:version."""
        if not isinstance(ref, str) or not ref:
            raise InvalidInput("artifact must be an artifact id, an id prefix or name:version")
        if ":" in ref:
            name, _, version = ref.partition(":")
            matches = [
                r.key
                for r in self.store.list(ARTIFACTS)
                if (r.value.get("name"), r.value.get("version")) == (name, version)
            ]
        elif len(ref) >= MIN_ID_PREFIX and _HEX.match(ref):
            matches = [r.key for r in self.store.list(ARTIFACTS, prefix=ref)]
        else:
            raise InvalidInput(
                f"artifact must be a 64-hex-digit id, an id prefix of at least {MIN_ID_PREFIX} "
                f"lowercase hex digits, or name:version; got {ref!r}"
            )
        if not matches:
            raise NotFound(f"unknown artifact {ref!r}; {PUSH_HINT}", code="unknown_artifact")
        if len(matches) > 1:
            raise InvalidInput(f"artifact id prefix {ref!r} is ambiguous; give more digits")
        return matches[0]

    # Deployments

    def put_deployment(
        self,
        name: str,
        artifact: str,
        replicas: dict[str, Any],
        revision: int | None = None,
        *,
        canary_percent: int | None = None,
        allow_rolled_back: bool = False,
        autoscaling: Any = KEEP,
    ) -> dict[str, Any]:
        """Create or update a deployment; with ``revision`` only if it is still at it.

        A new artifact on an existing deployment starts a rolling update (region by region)
        or, with ``canary_percent``, a canary on that share of every region's replicas.
        ``autoscaling`` (``{"*" or region: policy}``) replaces the deployment's policies;
        ``{}`` removes them and :data:`KEEP` leaves them as they are.
        """
        check_name(name, "deployment name")
        try:
            artifact_id = self.resolve_artifact(artifact)
        except NotFound as exc:
            raise InvalidInput(exc.message, code="unknown_artifact") from exc
        regions = [r.key for r in self.store.list(REGIONS)]
        counts = check_replica_counts(replicas, regions)
        policies = KEEP if autoscaling is KEEP else check_autoscaling(autoscaling or {}, regions)
        if canary_percent is not None and not 1 <= canary_percent <= 99:
            raise InvalidInput(
                f"canary must be a share from 1% to 99% of the replicas, got {canary_percent}%; "
                "deploy without --canary to replace every replica"
            )

        def change(existing: Record | None) -> dict[str, Any]:
            now = self._now()
            if existing is None:
                value = self._new_deployment(name, artifact_id, counts, canary_percent, now)
            else:
                value = self._changed_deployment(
                    existing.value, artifact_id, counts, canary_percent, allow_rolled_back, now
                )
            if policies is not KEEP:
                value["autoscaling"] = policies
            value.setdefault("autoscaling", {})
            value["rollout"] = self._advanced(value)
            return value

        record = self._update(name, change, revision)
        value = record.value
        log.info(
            "deployment %s -> artifact %s replicas %s rollout %s (revision %d)",
            name,
            artifact_id[:12],
            counts,
            (value["rollout"] or {}).get("state", "none"),
            record.revision,
        )
        return _out(record)

    def _new_deployment(
        self,
        name: str,
        artifact_id: str,
        counts: dict[str, int],
        canary_percent: int | None,
        now: float,
    ) -> dict[str, Any]:
        if canary_percent is not None:
            raise InvalidInput(
                f"deployment {name!r} does not exist yet, so there is nothing to compare a "
                "canary with; deploy it first without --canary"
            )
        return {
            "name": name,
            "artifact": artifact_id,
            "replicas": counts,
            "history": [{"artifact": artifact_id, "deployed_at": now}],
            "rolled_back": [],
            "rollout": None,
            "created_at": now,
            "updated_at": now,
        }

    def _changed_deployment(
        self,
        previous: dict[str, Any],
        artifact_id: str,
        counts: dict[str, int],
        canary_percent: int | None,
        allow_rolled_back: bool,
        now: float,
    ) -> dict[str, Any]:
        name = previous["name"]
        value = {**previous, "replicas": counts, "updated_at": now}
        rolled_back = list(previous.get("rolled_back") or [])
        if artifact_id in rolled_back:
            if not allow_rolled_back:
                raise Conflict(
                    f"artifact {artifact_id[:12]} was rolled back from deployment {name!r} and "
                    "must not serve it again; deploy it anyway with --allow-rolled-back "
                    '(API: "allow_rolled_back": true)',
                    code="rolled_back_artifact",
                )
            value["rolled_back"] = [a for a in rolled_back if a != artifact_id]

        rollout = dict(previous.get("rollout") or {})
        active = rollout.get("state") in ACTIVE_ROLLOUTS
        if artifact_id == previous["artifact"]:
            if canary_percent is not None:
                if rollout.get("state") != CANARY:
                    raise InvalidInput(
                        f"deployment {name!r} already runs artifact {artifact_id[:12]}; "
                        "a canary needs a different artifact"
                    )
                value["rollout"] = {**rollout, "canary_percent": canary_percent, "updated_at": now}
            return value
        if active:
            raise Conflict(
                f"deployment {name!r} is in a {rollout['state']} rollout from artifact "
                f"{str(rollout.get('from'))[:12]} to {str(previous['artifact'])[:12]}; finish it "
                f"with `anycast deploy {name} --promote` (a canary) or undo it with "
                f"`anycast rollback {name}` before deploying another artifact",
                code="rollout_in_progress",
            )
        value["artifact"] = artifact_id
        value["history"] = _history(previous, artifact_id, now)
        value["rollout"] = {
            "state": CANARY if canary_percent is not None else ROLLING,
            "from": previous["artifact"],
            "to": artifact_id,
            "canary_percent": canary_percent,
            "regions": rollout_order(counts),
            "done": [],
            "current": None,
            "started_at": now,
            "updated_at": now,
        }
        return value

    def _update(
        self,
        name: str,
        change: Callable[[Record | None], dict[str, Any]],
        revision: int | None,
    ) -> Record:
        """Write ``change(current)`` compare-and-set, so no concurrent change is lost.

        With ``revision`` the caller's expectation decides (a mismatch is a 409); without
        it a lost race is retried on the new current value.
        """
        for _ in range(ROLLOUT_RETRIES - 1):
            try:
                return self._put_changed(name, change, revision)
            except Conflict as exc:
                if revision is not None or "revision" not in exc.details:
                    raise  # the caller's expectation, or a rule such as rollout_in_progress
        return self._put_changed(name, change, revision)

    def _put_changed(
        self,
        name: str,
        change: Callable[[Record | None], dict[str, Any]],
        revision: int | None,
    ) -> Record:
        existing = self.store.get(DEPLOYMENTS, name)
        value = change(existing)
        expected = revision
        if expected is None:
            expected = existing.revision if existing else 0
        return self.store.put(DEPLOYMENTS, name, value, expected_revision=expected)

    def _advanced(self, value: dict[str, Any]) -> dict[str, Any] | None:
        """``value``'s rollout with every region done whose replicas already are ready."""
        rollout = value.get("rollout")
        if not rollout or rollout.get("state") != ROLLING:
            return rollout
        records = self.store.list(REPLICAS)
        observed = {r.key: r.value.get("replicas", []) for r in records}
        # Autoscaled regions are done once they run as many as their agent wants now.
        counts = effective_counts(value, reports_by_region(self._scale_rows(records)))
        moved = advance(rollout, with_counts(value, counts), observed)
        if moved != rollout:
            moved["updated_at"] = self._now()
        return moved

    def advance_rollout(self, name: str) -> None:
        """Mark regions of ``name``'s rolling update done as their new replicas get ready."""
        for _ in range(ROLLOUT_RETRIES):
            record = self.store.get(DEPLOYMENTS, name)
            if record is None:
                return
            rollout = record.value.get("rollout")
            moved = self._advanced(record.value)
            if moved == rollout:
                return
            assert moved is not None
            try:
                self.store.put(
                    DEPLOYMENTS,
                    name,
                    {**record.value, "rollout": moved},
                    expected_revision=record.revision,
                )
            except Conflict:
                continue  # someone changed the deployment meanwhile: look again
            _log_progress(name, moved)
            return

    def promote(self, name: str, revision: int | None = None) -> dict[str, Any]:
        """Turn ``name``'s canary into a rolling update of every replica, region by region."""
        check_name(name, "deployment name")

        def change(existing: Record | None) -> dict[str, Any]:
            value = dict(self._deployment_value(name, existing))
            rollout = dict(value.get("rollout") or {})
            if rollout.get("state") != CANARY:
                raise Conflict(
                    f"deployment {name!r} has no canary to promote (rollout: "
                    f"{rollout.get('state', 'none')}); start one with "
                    f"`anycast deploy {name} --artifact NEW --canary 10%`",
                    code="no_canary",
                )
            rollout.update(state=ROLLING, done=[], current=None, updated_at=self._now())
            value.update(rollout=rollout, updated_at=self._now())
            value["rollout"] = self._advanced(value)
            return value

        written = self._update(name, change, revision)
        log.info("deployment %s: canary of %s promoted", name, str(written.value["artifact"])[:12])
        return _out(written)

    def rollback(self, name: str, revision: int | None = None) -> dict[str, Any]:
        """Go back to the artifact before the current one, which never serves ``name`` again."""
        check_name(name, "deployment name")

        def change(existing: Record | None) -> dict[str, Any]:
            return self._rolled_back(name, self._deployment_value(name, existing))

        written = self._update(name, change, revision)
        rollout = written.value["rollout"]
        log.warning(
            "deployment %s rolled back from artifact %s to %s",
            name,
            rollout["from"][:12],
            rollout["to"][:12],
        )
        return _out(written)

    def _rolled_back(self, name: str, previous: dict[str, Any]) -> dict[str, Any]:
        value = dict(previous)
        bad = str(value["artifact"])
        rollout = value.get("rollout") or {}
        back_to = _previous_artifact(value)
        if back_to is None:
            raise Conflict(
                f"deployment {name!r} has no earlier artifact to roll back to (it runs "
                f"{bad[:12]}); deploy another one with `anycast deploy {name} --artifact REF`",
                code="nothing_to_roll_back",
            )
        now = self._now()
        value["artifact"] = back_to
        value["rolled_back"] = sorted({*(value.get("rolled_back") or []), bad})
        value["history"] = _history(value, back_to, now)
        interrupted = rollout.get("state") if rollout.get("state") in ACTIVE_ROLLOUTS else None
        value["rollout"] = {
            "state": ROLLED_BACK,
            "from": bad,
            "to": back_to,
            "canary_percent": None,
            "interrupted": interrupted,
            "regions": rollout_order(value.get("replicas") or {}),
            "done": [],
            "current": None,
            "started_at": now,
            "updated_at": now,
        }
        value["updated_at"] = now
        return value

    def _deployment_value(self, name: str, record: Record | None) -> dict[str, Any]:
        if record is None:
            raise _no_deployment(name)
        return record.value

    def deployments(self) -> list[dict[str, Any]]:
        return [_out(r) for r in self.store.list(DEPLOYMENTS)]

    def deployment(self, name: str) -> dict[str, Any]:
        record = self.store.get(DEPLOYMENTS, check_name(name, "deployment name"))
        if record is None:
            raise _no_deployment(name)
        return _out(record)

    def delete_deployment(self, name: str, revision: int | None = None) -> dict[str, Any]:
        check_name(name, "deployment name")
        try:
            record = self.store.delete(DEPLOYMENTS, name, expected_revision=revision)
        except NotFound as exc:
            raise NotFound(f"no deployment named {name!r}") from exc
        log.info("deployment %s deleted", name)
        return _out(record)

    # Replicas (observed)

    def report_replicas(
        self,
        region: str,
        replicas: list[dict[str, Any]],
        autoscaling: list[dict[str, Any]] | None = None,
    ) -> None:
        """Replace ``region``'s observed replicas (and its autoscaled counts) with the agent's.

        ``autoscaling`` rows are ``{"deployment", "desired", "in_flight", "idle_seconds"}``.
        """
        current = self.region(region)
        scaled = [{**row, "region": region} for row in autoscaling or []]
        for row in scaled:
            check_name(row["deployment"], "deployment name")
        ids = [r["id"] for r in replicas]
        if len(set(ids)) != len(ids):
            raise InvalidInput("replica ids must be unique within a report")
        for replica in replicas:
            if replica["region"] != region:
                raise InvalidInput(
                    f"replica {replica['id']} says region {replica['region']!r} but was "
                    f"reported for region {region!r}"
                )

        previous = self.store.get(REPLICAS, region)
        value = {"region": region, "replicas": replicas, "autoscaling": scaled}
        if previous is None or previous.value != value:
            self.store.put(REPLICAS, region, value)
        current.pop("revision")
        self.store.put(REGIONS, region, {**current, "last_seen": self._now()})
        for record in self.store.list(DEPLOYMENTS):
            rollout = record.value.get("rollout") or {}
            if rollout.get("state") == ROLLING and rollout.get("current") == region:
                self.advance_rollout(record.key)

    def replicas(
        self, region: str | None = None, deployment: str | None = None
    ) -> list[dict[str, Any]]:
        found = []
        for record in self.store.list(REPLICAS):
            if region and record.key != region:
                continue
            for replica in record.value.get("replicas", []):
                if deployment and replica.get("deployment") != deployment:
                    continue
                found.append(replica)
        return found

    def _scale_rows(self, records: list[Record] | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for record in self.store.list(REPLICAS) if records is None else records:
            rows.extend(record.value.get("autoscaling") or [])
        return rows

    def autoscaling(self) -> list[dict[str, Any]]:
        """The counts agents chose for the deployments they autoscale, one row per region."""
        return sorted(self._scale_rows(), key=lambda r: (r["deployment"], r["region"]))

    def scale(self, name: str) -> dict[str, Any]:
        """Per region: the policy (or none), the count wanted now and the replicas observed."""
        deployment = self.deployment(name)
        rows = [r for r in self._scale_rows() if r.get("deployment") == name]
        counts = effective_counts(deployment, reports_by_region(rows))
        reported = {r["region"]: r for r in rows}
        replicas = self.replicas(deployment=name)
        regions: dict[str, Any] = {}
        for region in sorted(set(counts) | {r["region"] for r in replicas}):
            mine = [r for r in replicas if r["region"] == region and r["state"] != "stopping"]
            row = reported.get(region, {})
            regions[region] = {
                "policy": policy_for(deployment, region),
                "desired": counts.get(region, 0),
                "observed": len(mine),
                "ready": sum(1 for r in mine if r["state"] == "ready"),
                "in_flight": row.get("in_flight"),
                "idle_seconds": row.get("idle_seconds"),
            }
        return {"deployment": name, "revision": deployment["revision"], "regions": regions}

    # Everything

    def state(self) -> dict[str, Any]:
        """A snapshot of every kind; objects may be newer than ``revision``, never older."""
        revision = self.store.revision()
        return {
            "revision": revision,
            "regions": self.regions(),
            "artifacts": self.artifacts(),
            "deployments": self.deployments(),
            "replicas": self.replicas(),
            "autoscaling": self.autoscaling(),
        }


def _no_deployment(name: str) -> NotFound:
    return NotFound(f"no deployment named {name!r}; create it with PUT /v1/deployments")


def _history(value: dict[str, Any], artifact_id: str, now: float) -> list[dict[str, Any]]:
    """The deployment's artifacts so far, newest last, with ``artifact_id`` appended."""
    history = list(value.get("history") or [{"artifact": value["artifact"], "deployed_at": None}])
    history.append({"artifact": artifact_id, "deployed_at": now})
    return history[-HISTORY_LIMIT:]


def _previous_artifact(value: dict[str, Any]) -> str | None:
    """What a rollback returns to: the rollout's old artifact, else the last one before."""
    current = value["artifact"]
    rollout = value.get("rollout") or {}
    banned = set(value.get("rolled_back") or []) | {current}
    if rollout.get("state") in ACTIVE_ROLLOUTS and rollout.get("from") not in banned:
        return str(rollout["from"])
    for entry in reversed(value.get("history") or []):
        if entry.get("artifact") not in banned:
            return str(entry["artifact"])
    return None


def _log_progress(name: str, rollout: dict[str, Any]) -> None:
    if rollout.get("state") != ROLLING:
        log.info("deployment %s: rollout to %s complete", name, str(rollout.get("to"))[:12])
        return
    log.info(
        "deployment %s: rollout to %s done in %s, now in %s",
        name,
        str(rollout.get("to"))[:12],
        ", ".join(rollout.get("done", [])) or "no region yet",
        rollout.get("current"),
    )
