"""auth.py, pinned where mutation testing (bench/mutation.py) found that the tests of its
map noticed nothing: the 200-character edge of a key's name, the token bucket's exact
arithmetic (`RateLimit.wait` under the test's own clock), when a kept key is asked of
the store again, and which header is `x-api-key`.

Over a real store; `RateLimit` takes the time as an argument, and the Authenticator
reads an injected clock, so nothing here depends on how fast the machine is. How often
the store is read is seen through SQLite's exec_trace (`sqlite_only`); under PostgreSQL
every request reads the key anyway (its `read_version()` moves at every refresh).

Equivalent: none found; every survivor of the run is killed below.
"""

from __future__ import annotations

import time

import pytest
from starlette.requests import Request

from minibatch.auth import Authenticator, RateLimit, create_tenant_key, hash_key
from minibatch.errors import InvalidInput, Unauthorized
from minibatch.store import open_store

pytestmark = pytest.mark.anyio

TOUCH = 60.0  # KEY_TOUCH_S, written out


def request_with(*headers: tuple[str, str]) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "query_string": b"",
                    "headers": [(k.encode(), v.encode()) for k, v in headers]})


def test_a_keys_name_may_have_200_characters_and_not_201(db_path):
    store = open_store(db_path)
    out = create_tenant_key(store, "acme", "n" * 200)
    assert [k["name"] for k in store.keys_list("acme") if k["id"] == out["key_id"]] == [
        "n" * 200]
    with pytest.raises(InvalidInput, match="name"):
        create_tenant_key(store, "acme", "n" * 201)
    store.close()


def test_the_bucket_drains_refills_at_the_rate_and_says_how_long_to_wait():
    limit = RateLimit(2.0)  # bursts of 2, a token every 0.5 s
    key = b"k"
    assert limit.wait(key, 10.0) == 0.0  # a new key starts with a full bucket
    assert limit.wait(key, 10.0) == 0.0
    assert limit.wait(key, 10.0) == pytest.approx(0.5)  # empty: a whole token to come
    assert limit.wait(key, 10.0) == pytest.approx(0.5)  # a refusal takes nothing
    assert limit.wait(key, 10.25) == pytest.approx(0.25)  # half a token came back
    assert limit.wait(key, 10.5) == 0.0  # exactly one token: it goes
    assert limit.wait(key, 10.5) == pytest.approx(0.5)  # and the bucket is empty again
    assert limit.wait(key, 10.75) == pytest.approx(0.25)
    assert limit.wait(key, 100.0) == 0.0  # a long pause refills it, to the burst only
    assert limit.wait(key, 100.0) == 0.0
    assert limit.wait(key, 100.0) == pytest.approx(0.5)
    assert limit.wait(b"other", 100.0) == 0.0  # each key its own bucket


def test_a_slow_rate_has_a_burst_of_one_and_refills_from_the_last_request():
    limit = RateLimit(0.25)  # a token every 4 s, bursts of 1
    key = b"k"
    assert limit.wait(key, 1.0) == 0.0
    assert limit.wait(key, 1.0) == pytest.approx(4.0)
    assert limit.wait(key, 3.0) == pytest.approx(2.0)  # 2 s later: half a token
    assert limit.wait(key, 5.0) == 0.0  # 2 s more: the whole token
    assert limit.wait(key, 5.0) == pytest.approx(4.0)


def kept_key(db_path: str, clock: list[float]):
    """A store, an Authenticator on `clock`, a key, its bearer header, and a reader of
    its `last_used_at`."""
    store = open_store(db_path)
    auth = Authenticator(store, lambda: clock[0])
    out = create_tenant_key(store, "acme")
    bearer = ("authorization", f"Bearer {out['api_key']}")

    def last_used() -> float | None:
        return store._one("SELECT last_used_at FROM api_keys WHERE id=?", (out["key_id"],))[0]

    return store, auth, bearer, last_used


async def test_a_kept_key_is_asked_again_once_exactly_a_minute_old(db_path):
    clock = [1000.0]
    store, auth, bearer, last_used = kept_key(db_path, clock)
    assert await auth.tenant(request_with(bearer)) == "acme"
    assert last_used() == 1000.0
    clock[0] = 1000.0 + TOUCH / 2
    assert await auth.tenant(request_with(bearer)) == "acme"  # read again (the write moved
    assert last_used() == 1000.0  # the version), kept from here on
    clock[0] = 1000.0 + TOUCH
    assert await auth.tenant(request_with(bearer)) == "acme"
    assert last_used() == 1000.0 + TOUCH
    store.close()


async def test_a_kept_key_is_asked_again_after_a_long_pause(db_path):
    """A minute and more since the kept `last_used_at` (1010 s, whose remainder by the
    kept 1000.0 is only 10) asks the store, which writes the new time."""
    clock = [1000.0]
    store, auth, bearer, last_used = kept_key(db_path, clock)
    await auth.tenant(request_with(bearer))
    clock[0] = 1030.0
    await auth.tenant(request_with(bearer))
    clock[0] = 2010.0
    assert await auth.tenant(request_with(bearer)) == "acme"
    assert last_used() == 2010.0
    store.close()


def key_reads(store, clock: list[float]) -> list[float]:
    """The times (by `clock`) at which the store reads a key, seen through SQLite's
    exec_trace; the caller sets `store.conn.exec_trace = None` when done."""
    reads: list[float] = []

    def trace(cursor, sql: str, bindings) -> bool:
        if "FROM api_keys WHERE key_hash=?" in sql and sql.startswith("SELECT"):
            reads.append(clock[0])
        return True

    store.conn.exec_trace = trace
    return reads


@pytest.mark.sqlite_only
async def test_a_kept_key_is_not_read_again_within_the_minute(db_path):
    clock = [1000.0]
    store, auth, bearer, _ = kept_key(db_path, clock)
    reads = key_reads(store, clock)
    await auth.tenant(request_with(bearer))  # read, and last_used_at written
    clock[0] = 1010.0
    await auth.tenant(request_with(bearer))  # read again: the write moved the version
    for t in (1020.0, 1030.0, 1040.0, 1059.0):
        clock[0] = t
        assert await auth.tenant(request_with(bearer)) == "acme"
    clock[0] = 1060.0
    await auth.tenant(request_with(bearer))
    store.conn.exec_trace = None
    assert reads == [1000.0, 1010.0, 1060.0]
    store.close()


@pytest.mark.sqlite_only
async def test_an_unknown_key_is_kept_as_unknown_within_the_minute(db_path):
    clock = [1000.0]
    store = open_store(db_path)
    auth = Authenticator(store, lambda: clock[0])
    reads = key_reads(store, clock)
    digest = hash_key("mb_" + "u" * 43)
    for t in (1000.0, 1030.0, 1059.0, 1060.0):
        clock[0] = t
        assert await auth.tenant_of(digest) is None
    store.conn.exec_trace = None
    assert reads == [1000.0, 1060.0]
    store.close()


async def test_only_the_header_named_x_api_key_is_the_key(db_path):
    """Headers whose names sort after `x-api-key` (a proxy's x-forwarded-for, a
    request id) are not a key."""
    store = open_store(db_path)
    auth = Authenticator(store, time.time)
    key = create_tenant_key(store, "acme")["api_key"]
    assert await auth.tenant(request_with(("x-forwarded-for", "10.0.0.1"),
                                          ("authorization", f"Bearer {key}"))) == "acme"
    assert await auth.tenant(request_with(("x-request-id", "req-1"),
                                          ("x-api-key", key))) == "acme"
    with pytest.raises(Unauthorized):
        await auth.tenant(request_with(("x-request-id", key)))
    store.close()
