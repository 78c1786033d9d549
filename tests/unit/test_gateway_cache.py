"""The gateway's response cache: keys, the LRU bounds, what is never stored."""

from __future__ import annotations

from anycast.gateway.cache import Reply, ResponseCache, cache_key

ART = "a" * 64


def _reply(body: bytes = b"{}", status: int = 200) -> Reply:
    return Reply(status, body, "application/json", "r-1", ART, "us-east")


def test_keys_differ_by_artifact_handler_content_type_and_body() -> None:
    base = cache_key(ART, "predict", "application/json", b'{"x":1}')

    assert base == cache_key(ART, "predict", "application/json", b'{"x":1}')
    assert (
        len(
            {
                base,
                cache_key("b" * 64, "predict", "application/json", b'{"x":1}'),
                cache_key(ART, "square", "application/json", b'{"x":1}'),
                cache_key(ART, "predict", "text/plain", b'{"x":1}'),
                cache_key(ART, "predict", "application/json", b'{"x":2}'),
                cache_key(ART, "predic", "tapplication/json", b'{"x":1}'),  # no ambiguity
            }
        )
        == 6
    )


def test_least_recently_used_entry_goes_first_when_full() -> None:
    cache = ResponseCache(max_entries=2)
    cache.put("a", _reply(b"1"))
    cache.put("b", _reply(b"2"))
    assert cache.get("a") is not None  # a is now the most recently used

    cache.put("c", _reply(b"3"))

    assert cache.get("b") is None
    assert cache.get("a") == _reply(b"1") and cache.get("c") == _reply(b"3")
    assert len(cache) == 2


def test_byte_bound_evicts_and_refuses_bodies_larger_than_the_bound() -> None:
    cache = ResponseCache(max_entries=100, max_bytes=10)
    cache.put("a", _reply(b"12345"))
    cache.put("b", _reply(b"12345"))
    cache.put("c", _reply(b"123"))

    assert cache.get("a") is None and cache.get("b") is not None
    assert cache.bytes == 8
    assert not cache.put("huge", _reply(b"x" * 11))
    assert cache.bytes == 8


def test_only_200_answers_are_stored_and_a_zero_size_cache_stores_nothing() -> None:
    cache = ResponseCache()
    assert not cache.put("err", _reply(status=500))
    assert not cache.put("bad", _reply(status=400))
    assert cache.get("err") is None and len(cache) == 0

    off = ResponseCache(max_entries=0)
    assert not off.enabled and not off.put("a", _reply())


def test_storing_a_key_again_replaces_it_without_leaking_bytes() -> None:
    cache = ResponseCache(max_bytes=100)
    cache.put("a", _reply(b"12345"))
    cache.put("a", _reply(b"12"))

    assert cache.bytes == 2 and len(cache) == 1
