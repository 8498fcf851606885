"""PostgresStore's own code, on a real PostgreSQL server: the database's clock, the
migrations on an empty database, the schema listing, LISTEN/NOTIFY, the connection pool
(dropped connections, threads side by side), and a claim skipping a row locked elsewhere.
Written against the survivors of `bench/mutation.sh --module store-postgres` (run under
MINIBATCH_TEST_STORE=postgres); skipped on SQLite.

Equivalent mutants of postgres.py, which no test can tell apart:
- `translate`'s `lru_cache` removed or resized: the function is pure; the cache only
  saves time.
- `[0]` -> `[-1]` in `_one`, `PgCursor.fetchone` and the clock's read: every statement
  read that way returns one row (a lookup by key, a count, one RETURNING row, one value).
- `changes()`'s default of 0 -> 1: every statement sets it before `changes()` reads it.
- `scope_lock`'s `[:8]` -> `[:7]`: any stable key serves as the advisory lock of a scope.
- the `(0.0,)` default of `webhook_schedule` -> `(-1.0,)`: `open_store` and `another()`
  always pass the schedule.
- `_reads` starting at -1 or counting by 2: `read_version` only needs a new value each time.
- `CLOCK_REFRESH_S` 60 -> 59: a minute or 59 s, the offset is measured again.
- the listening thread started with `daemon=False`: it ends by itself within
  LISTEN_POLL_S of being stopped, so nothing waits on it.
- `_batches_due`'s re-check `locked[seq] < concurrency` -> `is not` or `<=`: the shared
  query has already left out a batch at its cap, so they differ only if `running` reached
  the cap between the two reads of one claim, a race this suite does not force.
- `WRITE_LOCK`'s value changed: any constant key serves.
- `max(cur.rowcount, 0)` -> `max(..., -1)`: `changes()` is read after an UPDATE or
  DELETE, whose rowcount psycopg always knows.
- `POOL_SIZE` 8 -> 9, the pool's `num_workers` 1 -> 2, `CONNECT_TIMEOUT_S` 10 -> 11:
  a limit no test's threads reach, the pool's own background threads, and a timeout
  that only a server that never answers would show.
- the midpoint `(before + after) / 2` -> `// 2`: the offset moves by under a second, closer
  than a test can pin an offset measured over a round trip without flaking.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from tests.conftest import POSTGRES, database

pytestmark = pytest.mark.skipif(not POSTGRES, reason="PostgreSQL only"
                                " (MINIBATCH_TEST_STORE=postgres)")

T0 = 1_700_000_000.0


def open_pg(url: str):
    from minibatch.store import open_store

    return open_store(url)


def test_the_clock_is_the_databases_even_when_this_machines_is_off(db_path, monkeypatch):
    """A machine whose clock is 1,000 s behind the database's still keeps its time."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 1000.0)
    store = open_pg(db_path)
    try:
        assert abs(store.clock() - real()) < 30  # the offset put back what the clock lost
        assert store._clock_offset == pytest.approx(1000.0, abs=30)
    finally:
        monkeypatch.undo()
        store.close()


@pytest.mark.anyio
async def test_the_offset_is_measured_again_once_a_minute_in_a_calls_thread(db_path):
    """By a store call, in its worker thread: an event loop reading the clock never waits
    for the server. The clock itself measures only when no call has for two minutes."""
    store = open_pg(db_path)
    measured_at = store._clock_at  # at the start
    store.clock()
    await store.call(store.schema_version)
    assert store._clock_at == measured_at  # within the minute: not measured again
    store._clock_at -= 61.0  # as if a minute had passed
    store.clock()
    assert store._clock_at == measured_at - 61.0  # not on the loop
    await store.call(store.schema_version)
    assert store._clock_at > measured_at - 61.0  # but in the call's thread
    measured_at = store._clock_at = store._clock_at - 121.0  # no call for two minutes
    store.clock()
    assert store._clock_at > measured_at
    store.close()


def test_migrations_on_an_empty_database_are_numbered_one_by_one(tmp_path):
    from minibatch.store.pg_schema import PG_MIGRATIONS

    store = open_pg(database(tmp_path / "empty", empty=True))
    assert store._all("SELECT version FROM minibatch_schema ORDER BY version") == [
        (n,) for n in range(1, len(PG_MIGRATIONS) + 1)]
    assert store.schema_version() == len(PG_MIGRATIONS)
    assert "items items_due" in store.schema_sql()  # table, then index
    store.close()


def test_a_submit_anywhere_wakes_a_subscriber_until_it_stops(db_path):
    listener, submitter = open_pg(db_path), open_pg(db_path)
    heard: list[str] = []
    woke = threading.Event()

    def on_kind(kind: str) -> None:
        heard.append(kind)
        woke.set()

    before = set(threading.enumerate())
    stop = listener.subscribe(on_kind)
    (thread,) = [t for t in threading.enumerate()
                 if t not in before and t.name == "minibatch-listen"]
    deadline = time.monotonic() + 30
    while not woke.is_set() and time.monotonic() < deadline:  # LISTEN may not be up yet
        submitter.batch_insert(tenant="t", kind="ping", items=[{"input": 1}], now=T0,
                               max_attempts=1)
        woke.wait(0.5)
    assert woke.is_set() and set(heard) == {"ping"}
    stop()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the listening thread did not end"
    listener.close()
    submitter.close()


def _drop_connections(url: str) -> int:
    """What a server restart or a failover does to a store: every connection to its
    database is ended by the server. Returns once each has ended (pg_terminate_backend
    waits, up to its timeout), so the store's connections are dead by then."""
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
        ended = [r[0] for r in admin.execute(
            "SELECT pg_terminate_backend(pid, 60000) FROM pg_stat_activity"
            " WHERE datname = %s", (name,))]
    assert all(ended), "a backend outlived pg_terminate_backend's timeout"
    return len(ended)


def _past_pool_waits(call: Callable[[], object]) -> object:
    """`call()`, again while its 503 is the pool still opening a new connection (which a
    loaded machine may take longer than POOL_WAIT_S to do); any other 503 is raised."""
    from minibatch.errors import StorageUnavailable

    deadline = time.monotonic() + 60
    while True:
        try:
            return call()
        except StorageUnavailable as exc:
            if "no database connection" not in str(exc) or time.monotonic() > deadline:
                raise


def test_a_store_whose_connections_the_server_dropped_works_again(db_path):
    """At most the call that finds its connection gone fails, as a 503; the pool opens a
    new one for the next, reads and writes alike."""
    from minibatch.errors import StorageUnavailable

    url = database(db_path)
    store = open_pg(url)
    store.tenant_create("t", b"k", "secret_1", "whsec_eA", T0, key_id="key_1")
    assert _drop_connections(url) >= 1
    answers: list[object] = []
    for _ in range(2):
        try:
            answers.append(_past_pool_waits(lambda: store.tenant_exists("t")))
            break
        except StorageUnavailable:
            answers.append("503")
    assert answers[-1] is True and answers.count("503") <= 1, answers
    assert _drop_connections(url) >= 1

    def create() -> object:
        return store.tenant_create("u", b"k2", "secret_2", "whsec_eB", T0, key_id="key_2")

    try:
        _past_pool_waits(create)
    except StorageUnavailable:  # the write that found its connection gone changed nothing
        assert _past_pool_waits(lambda: store.tenant_exists("u")) is False
        _past_pool_waits(create)
    assert store.tenant_exists("u") is True
    store.close()


def test_a_read_does_not_wait_for_another_threads_open_transaction(db_path):
    """Each thread takes its own connection from the pool, so a read is not queued
    behind a write transaction another thread holds open (one shared connection would
    make it wait for the COMMIT)."""
    store = open_pg(db_path)
    store.tenant_create("t", b"k", "secret_1", "whsec_eA", T0, key_id="key_1")
    inside, release = threading.Event(), threading.Event()

    def hold_a_transaction() -> None:
        with store._tx() as cur:
            cur.execute("UPDATE tenants SET name = name WHERE name = 't'")
            inside.set()
            release.wait(60)

    holder = threading.Thread(target=hold_a_transaction)
    holder.start()
    try:
        assert inside.wait(30)
        read: list[bool] = []
        reader = threading.Thread(target=lambda: read.append(store.tenant_exists("t")))
        reader.start()
        reader.join(timeout=30)
        assert read == [True], "the read waited for the other thread's transaction"
        assert holder.is_alive()  # the transaction was still open while the read ran
    finally:
        release.set()
        holder.join(timeout=30)
    store.close()


def test_a_claim_skips_an_item_another_transaction_holds_and_does_not_wait_for_it(db_path):
    """FOR UPDATE SKIP LOCKED: an item row locked elsewhere (another process's claim or
    outcome in flight) is left to that transaction; the claim takes the others at once."""
    import psycopg

    url = database(db_path)
    store = open_pg(url)
    store.batch_insert(tenant="t", kind="k", items=[{"input": i} for i in range(3)], now=T0,
                       max_attempts=1)
    with psycopg.connect(url) as other:  # a transaction open until the block ends
        (locked,) = other.execute("SELECT seq FROM items ORDER BY seq LIMIT 1"
                                  " FOR UPDATE").fetchone()
        claimed: list = []
        claimer = threading.Thread(target=lambda: claimed.extend(
            store.items_claim("k", 10, "o", T0, lease_s=30)))
        claimer.start()
        claimer.join(timeout=30)
        assert not claimer.is_alive(), "the claim waited for the locked row"
        assert sorted(c.seq for c in claimed) == [locked + 1, locked + 2]
    [last] = store.items_claim("k", 10, "o", T0, lease_s=30)  # the lock is gone
    assert last.seq == locked
    store.close()


def test_a_closed_store_answers_503_not_a_pool_error(db_path):
    from minibatch.errors import StorageUnavailable

    store = open_pg(db_path)
    store.close()
    with pytest.raises(StorageUnavailable):
        store.tenant_exists("t")
