from anycast.local.load import CallResult, LoadReport, percentile, run_until


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


def test_max_gap_covers_the_edges_and_ignores_failed_calls() -> None:
    calls = [
        CallResult(0, "us-east", 200, "us-east", "r1", 5.0, {}, finished_at=10.2),
        CallResult(1, "us-east", 503, None, None, 1.0, None, "unavailable", finished_at=10.9),
        CallResult(2, "us-east", 200, "us-east", "r1", 5.0, {}, finished_at=11.0),
    ]
    report = LoadReport(calls)
    assert report.max_gap_ms(10.0, 11.1) == 800.0
    assert LoadReport([]).max_gap_ms(0.0, 2.0) == 2000.0


async def _serve_until_stopped() -> tuple[int, int]:
    import asyncio
    import contextlib

    from anycast.core.http import LOOPBACK, free_port

    port = free_port()
    answered = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while await reader.readuntil(b"\r\n\r\n"):
                await reader.readexactly(2)  # the body, b"{}"
                answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, LOOPBACK, port)
    stop = asyncio.Event()
    async with server:
        task = asyncio.create_task(
            run_until(f"http://{LOOPBACK}:{port}/", [b"{}"], ["us-east"], stop, concurrency=4)
        )
        await asyncio.sleep(0.3)
        stop.set()
        report = await task
    return len(report.calls), answered


def test_run_until_sends_until_stopped_and_counts_every_call() -> None:
    import asyncio

    sent, answered = asyncio.run(_serve_until_stopped())
    assert sent > 0
    assert sent == answered
