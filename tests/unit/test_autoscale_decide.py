"""The region agent's autoscaling decisions, with time passed in: no clock, no processes."""

from __future__ import annotations

from typing import Any

import pytest

from anycast.control.scaling import check_policy
from anycast.region.autoscale import (
    DeploymentScale,
    Recommendation,
    ReplicaCounters,
    decide,
    deployment_load,
    parse_metrics,
    recommend,
    replica_load,
)


def policy(**fields: Any) -> dict[str, Any]:
    base = {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_in_flight": 2,
        "scale_up_delay": 2,
        "scale_down_delay": 10,
        "idle_to_zero": 30,
    }
    return check_policy({**base, **fields})


def history(*pairs: tuple[float, int]) -> list[Recommendation]:
    return [Recommendation(at, n) for at, n in pairs]


def test_recommendation_is_load_over_target_rounded_up_within_min_and_max() -> None:
    p = policy()
    assert recommend(p, 0.0) == 1
    assert recommend(p, 2.0) == 1
    assert recommend(p, 2.1) == 2
    assert recommend(p, 6.0) == 3
    assert recommend(p, 100.0) == 4
    assert recommend(policy(min_replicas=0), 0.0) == 1  # while active, one replica at least


def test_scale_up_waits_until_the_load_stayed_high_for_the_whole_delay() -> None:
    p = policy(scale_up_delay=2)
    high = history((100.0, 1), (100.5, 3), (101.0, 3), (101.5, 3))

    assert decide(p, 1, high, last_active=101.5, now=101.5) == 1  # high for 1 s only
    assert decide(p, 1, [*high, *history((102.0, 3), (102.5, 3))], 102.5, now=102.5) == 3


def test_scale_up_goes_to_the_smallest_count_asked_for_during_the_delay() -> None:
    p = policy(scale_up_delay=2)
    samples = history((100.0, 2), (100.5, 4), (101.0, 3), (101.5, 4), (102.0, 4))

    assert decide(p, 1, samples, last_active=102.0, now=102.0) == 2


def test_short_burst_changes_nothing() -> None:
    p = policy(scale_up_delay=2)
    samples = history((100.0, 1), (100.5, 4), (101.0, 1), (101.5, 4), (102.0, 4))

    assert decide(p, 1, samples, last_active=102.0, now=102.5) == 1


def test_scale_up_with_no_delay_follows_the_latest_sample() -> None:
    assert decide(policy(scale_up_delay=0), 1, history((5.0, 3)), 5.0, now=5.0) == 3


def test_scale_down_waits_for_its_own_longer_delay_and_keeps_the_peak() -> None:
    p = policy(scale_down_delay=10)
    samples = history((100.0, 3), *((100.0 + i, 1) for i in range(1, 9)), (109.0, 2))

    assert decide(p, 3, samples, last_active=109.0, now=109.0) == 3  # low for 9 s only
    later = [*samples, *history((110.0, 1), (111.0, 1))]
    assert decide(p, 3, later, last_active=111.0, now=111.0) == 2  # 2 was asked within 10 s
    quiet = [*later, *history((120.0, 1))]
    assert decide(p, 3, quiet, last_active=120.0, now=120.0) == 1


def test_no_history_keeps_the_count() -> None:
    assert decide(policy(), 3, [], last_active=0.0, now=1000.0) == 3


def test_a_count_outside_a_changed_policy_is_brought_in_at_once() -> None:
    assert decide(policy(max_replicas=2), 4, history((0.0, 4)), 0.0, now=0.5) == 2
    assert decide(policy(min_replicas=3), 1, [], 0.0, now=0.5) == 3


def test_idle_deployment_with_min_zero_goes_to_zero_after_the_idle_period() -> None:
    p = policy(min_replicas=0, idle_to_zero=30)
    samples = history((0.0, 2), (10.0, 2), (29.0, 2))

    assert decide(p, 2, samples, last_active=0.0, now=29.9) == 2
    assert decide(p, 2, samples, last_active=0.0, now=30.0) == 0
    assert decide(policy(min_replicas=1, idle_to_zero=30), 2, samples, 0.0, now=300.0) == 2


def test_at_zero_only_a_wake_up_starts_a_replica() -> None:
    p = policy(min_replicas=0, idle_to_zero=30)
    scale = DeploymentScale(desired=0, last_active=0.0)

    scale.observe(p, {}, now=100.0)
    assert scale.step(p, now=100.0) == 0

    assert scale.wake(p, now=101.0) == 1
    scale.observe(p, {}, now=101.5)  # the replica is still starting: nothing measured
    assert scale.step(p, now=101.5) == 1
    assert scale.step(p, now=130.9) == 1
    assert scale.step(p, now=131.0) == 0  # idle for idle_to_zero after the wake-up


METRICS = """\
# HELP anycast_requests_total Handler calls by handler and HTTP status.
# TYPE anycast_requests_total counter
anycast_requests_total{handler="echo",status="200"} 10.0
anycast_requests_total{handler="echo",status="400"} 2.0
anycast_request_seconds_sum{handler="echo"} 3.5
anycast_request_seconds_count{handler="echo"} 12.0
anycast_in_flight 3.0
anycast_ready 1.0
"""


def test_metrics_text_gives_calls_busy_time_and_in_flight() -> None:
    counters = parse_metrics(METRICS, at=7.0)

    assert counters == ReplicaCounters(at=7.0, requests=12.0, busy_seconds=3.5, in_flight=3.0)
    assert parse_metrics("garbage\nanycast_in_flight NaN\n", at=1.0).in_flight == 0.0


def test_load_is_the_average_in_flight_since_the_last_sample() -> None:
    before = ReplicaCounters(at=10.0, requests=100, busy_seconds=50.0, in_flight=0)
    after = ReplicaCounters(at=12.0, requests=140, busy_seconds=56.0, in_flight=1)

    load, active = replica_load(before, after)

    assert load == pytest.approx(3.0)  # 6 s of calls in 2 s: three at a time
    assert active


def test_a_call_that_moved_between_replicas_is_counted_once() -> None:
    before = {
        "a": ReplicaCounters(at=10.0, requests=1, busy_seconds=0.0, in_flight=0),
        "b": ReplicaCounters(at=10.0, requests=0, busy_seconds=0.0, in_flight=0),
    }
    after = {  # one caller: a call of 0.3 s finished on a, the next one runs on b
        "a": ReplicaCounters(at=10.5, requests=2, busy_seconds=0.3, in_flight=0),
        "b": ReplicaCounters(at=10.5, requests=0, busy_seconds=0.0, in_flight=1),
    }

    load, active = deployment_load(before, after)

    assert load == pytest.approx(1.0)
    assert active


def test_a_quiet_replica_is_not_active_and_a_restarted_one_counts_its_gauge() -> None:
    before = ReplicaCounters(at=10.0, requests=100, busy_seconds=50.0, in_flight=0)
    same = ReplicaCounters(at=11.0, requests=100, busy_seconds=50.0, in_flight=0)
    restarted = ReplicaCounters(at=11.0, requests=3, busy_seconds=0.1, in_flight=2)

    assert replica_load(before, same) == (0.0, False)
    assert replica_load(before, restarted) == (2.0, True)
    assert replica_load(None, same) == (0.0, False)


def test_deployment_scale_scales_up_under_load_and_down_after_it() -> None:
    p = policy(scale_up_delay=1, scale_down_delay=3, min_replicas=1, max_replicas=4)
    scale = DeploymentScale(desired=1, last_active=0.0)
    busy = 0.0
    counts = []
    for step in range(40):
        t = step * 0.5
        loaded = step < 16
        busy += 0.5 * 6 if loaded else 0.0  # six calls in flight at all times, then none
        calls = step * 10 if loaded else 160
        scale.observe(p, {"r0": ReplicaCounters(t, calls, busy, in_flight=0)}, t)
        counts.append(scale.step(p, t))

    assert max(counts) == 3
    assert counts[-1] == 1
    assert counts.index(3) < 16
