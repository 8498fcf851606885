"""ReadCache on a real store: an answer is reused only while nothing stored changed."""

from __future__ import annotations

import pytest

from minibatch.models import encoder
from minibatch.readcache import MAX_ENTRIES, ReadCache
from minibatch.store import open_store

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


def test_an_answer_is_reused_until_any_connection_changes_anything(db_path):
    store, other = open_store(db_path), open_store(db_path)
    cache = ReadCache(store)
    row = submit(store)
    read = Reads(store, row.id)
    cache.refresh()
    first = cache.body("b", read)
    assert first == encoder.encode(store.batch_get(row.id))
    cache.refresh()
    stable = store.read_version() == store.read_version()  # PostgreSQL: never
    assert cache.body("b", read) == first
    assert read.count == (1 if stable else 2)

    other.batch_cancel(row.id, None, T0 + 1)  # another connection commits
    cache.refresh()
    cancelled = cache.body("b", read)
    assert b'"cancelled"' in cancelled and cancelled != first

    submit(store)  # this connection writes
    cache.refresh()
    count = read.count
    cache.body("b", read)
    assert read.count == count + 1
    store.close()
    other.close()


def test_a_failed_read_is_not_kept_and_the_cache_is_bounded(db_path):
    store = open_store(db_path)
    cache = ReadCache(store)
    cache.refresh()

    def missing():
        raise LookupError("no such batch")

    for _ in range(2):
        with pytest.raises(LookupError):
            cache.body("gone", missing)
    assert "gone" not in cache.kept
    for i in range(MAX_ENTRIES):
        cache.put(i, i)
    cache.refresh()
    assert cache.kept == {}
    store.close()
