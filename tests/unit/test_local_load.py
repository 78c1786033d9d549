from anycast.local.load import CallResult, LoadReport, percentile


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0


def test_report_counts_accuracy_and_regions() -> None:
    calls = [
        CallResult(0, "us-east", 200, "us-east", "r1", 5.0, {"digit": 3}),
        CallResult(1, "eu-west", 200, "eu-west", "r2", 7.0, {"digit": 1}),
        CallResult(2, "eu-west", 503, None, None, 1.0, None, "unavailable"),
    ]
    report = LoadReport(calls)
    assert report.failed == 1
    assert report.served_by_region() == {"us-east": 1, "eu-west": 1}
    assert report.accuracy([3, 2, 0]) == 1 / 3
    assert report.errors() == {"unavailable": 1}
    assert report.latency_ms("eu-west") == {"p50_ms": 7.0, "p99_ms": 7.0}
