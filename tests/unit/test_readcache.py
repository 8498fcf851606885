"""ReadCache on a real store: an answer is reused only while nothing stored changed, and
one read across a refresh that saw a change is never kept."""

from __future__ import annotations

import json

import pytest

from minibatch.models import encoder
from minibatch.readcache import MAX_ENTRIES, ReadCache
from minibatch.store import open_store

pytestmark = pytest.mark.anyio
T0 = 1_700_000_000.0


class Reads:
    """A read that counts how often it ran."""

    def __init__(self, store, batch_id: str) -> None:
        self.store, self.batch_id, self.count = store, batch_id, 0

    def __call__(self):
        self.count += 1
        return self.store.batch_get(self.batch_id)


def submit(store, n: int = 2):
    return store.batch_insert(tenant="t", kind="echo", items=[{"input": i} for i in range(n)],
                              now=T0, max_attempts=3)


async def test_an_answer_is_reused_until_any_connection_changes_anything(db_path):
    store, other = open_store(db_path), open_store(db_path)
    cache = ReadCache(store)
    row = submit(store)
    read = Reads(store, row.id)
    cache.refresh()
    first = await cache.body("b", read)
    assert first == encoder.encode(store.batch_get(row.id))
    cache.refresh()
    stable = store.read_version() == store.read_version()  # PostgreSQL: never
    assert await cache.body("b", read) == first
    assert read.count == (1 if stable else 2)

    other.batch_cancel(row.id, None, T0 + 1)  # another connection commits
    cache.refresh()
    cancelled = await cache.body("b", read)
    assert json.loads(cancelled)["status"] == "cancelled" and cancelled != first

    submit(store)  # this connection writes
    cache.refresh()
    count = read.count
    await cache.body("b", read)
    assert read.count == count + 1
    store.close()
    other.close()


async def test_a_failed_read_is_not_kept_and_the_cache_is_bounded(db_path):
    store = open_store(db_path)
    cache = ReadCache(store)
    cache.refresh()

    def missing():
        raise LookupError("no such batch")

    for _ in range(2):
        with pytest.raises(LookupError):
            await cache.body("gone", missing)
    assert "gone" not in cache.kept
    for i in range(MAX_ENTRIES):
        cache.put(i, i, cache.version)
    cache.refresh()
    assert cache.kept == {}
    store.close()


async def test_an_answer_read_across_a_refresh_that_saw_a_change_is_not_kept(db_path):
    """A read that suspends (PostgreSQL's runs in a thread) while a change commits and
    another request refreshes past it must not leave its older answer to the requests
    after: it is kept only if the version it was read under is still the current one."""
    store, other = open_store(db_path), open_store(db_path)
    cache = ReadCache(store)
    row = submit(store)
    cache.refresh()

    def read_while_another_request_cancels():
        batch = store.batch_get(row.id)  # read under the version taken above
        other.batch_cancel(row.id, None, T0 + 1)  # meanwhile a cancel commits, and
        cache.refresh()  # another request's refresh sees it
        return batch

    stale = await cache.body("b", read_while_another_request_cancels)
    assert json.loads(stale)["status"] == "queued"  # its caller gets what it read ...
    assert cache.get("b") is None  # ... but it is not kept
    fresh = await cache.body("b", lambda: store.batch_get(row.id))
    assert json.loads(fresh)["status"] == "cancelled"
    assert cache.get("b") == fresh  # nothing moved while it was read: kept

    version = cache.version
    cache.put("k", 1, version)
    assert cache.get("k") == 1  # read under the current version: kept
    submit(other)
    cache.refresh()
    cache.put("k", 2, version)  # read before the refresh that saw `submit`: dropped
    assert cache.get("k") is None
    store.close()
    other.close()
