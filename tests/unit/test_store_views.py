"""The dashboard's reads and sessions on a real SQLite file, under an injected clock:
errors grouped, a batch's throughput per second, an endpoint's health, sessions, and the
rows the live page polls.

Equivalent mutant of views.py: `endpoint_health`'s `r[0] == "succeeded"` -> `>=`: of the
statuses a delivery ends with (succeeded, failed), only "succeeded" sorts there.
"""

from __future__ import annotations

import pytest

from minibatch.delivery import AttemptRecord
from minibatch.store import Outcome, Store, error_bytes, open_store
from minibatch.store import views as views_module

T0 = 1_000_000.0


def submit(store: Store, n: int, **kw):
    return store.batch_insert(tenant="t", kind="k", items=[{"input": i} for i in range(n)],
                              now=T0, max_attempts=1, **kw)


def end(store: Store, count: int, now: float, errors: list[str] | None = None) -> None:
    """Claim `count` items and end them at `now`: failed with `errors[i]` where given."""
    claimed = store.items_claim("k", count, "o", now, lease_s=30)
    assert len(claimed) == count
    outcomes = []
    for i, c in enumerate(claimed):
        message = errors[i] if errors else None
        outcomes.append(Outcome(c.seq, c.batch_seq, c.token,
                                "failed" if message else "succeeded",
                                None if message else b"1",
                                error_bytes("boom", message) if message else None, 0.0))
    assert store.items_finish(outcomes, "o", now) == count


def test_errors_are_grouped_by_code_and_message_most_frequent_first(db_path):
    store = open_store(db_path)
    row = submit(store, 7)
    end(store, 7, T0, ["b", "a", "b", "c", "b", "a", None])
    assert store.items_error_groups(row.seq, 10) == [("boom", "b", 3), ("boom", "a", 2),
                                                     ("boom", "c", 1)]
    assert store.items_error_groups(row.seq, 2) == [("boom", "b", 3), ("boom", "a", 2)]
    other = submit(store, 1)
    assert store.items_error_groups(other.seq, 10) == []


def test_error_groups_read_only_the_first_failures(db_path, monkeypatch):
    monkeypatch.setattr(views_module, "ERRORS_SCANNED", 4)
    store = open_store(db_path)
    row = submit(store, 6)
    end(store, 6, T0, ["x", "x", "x", "y", "y", "y"])
    assert store.items_error_groups(row.seq, 10) == [("boom", "x", 3), ("boom", "y", 1)]


def test_the_live_page_reads_the_rows_of_the_tenants_batches_asked_for(db_path):
    store = open_store(db_path)
    first, second = submit(store, 1), submit(store, 2)
    theirs = store.batch_insert(tenant="other", kind="k", items=[{"input": 0}], now=T0,
                                max_attempts=1)
    rows = store.batch_rows([second.id, theirs.id, first.id, "batch_unknown"], "t")
    assert sorted((r.id, r.total) for r in rows) == sorted([(first.id, 1), (second.id, 2)])
    assert store.batch_rows([], "t") == []


def test_throughput_counts_items_ended_per_second(db_path):
    store = open_store(db_path)
    row = submit(store, 10)
    assert store.batch_throughput(row.seq, 60) == (0, 1, [])
    end(store, 3, T0 + 0.2)
    end(store, 2, T0 + 0.9)  # the same second: added to it
    end(store, 4, T0 + 3.5, ["e"] * 4)  # failures count, and a quiet second is a 0
    assert store.batch_throughput(row.seq, 60) == (int(T0), 1, [5, 0, 0, 4])


def test_throughput_buckets_a_long_life_into_at_most_the_bars_asked(db_path):
    store = open_store(db_path)
    row = submit(store, 7)
    for second in (0, 1, 2, 3, 4, 5, 9):
        end(store, 1, T0 + second)
    # 10 seconds in at most 4 bars: 3 seconds a bar
    assert store.batch_throughput(row.seq, 4) == (int(T0), 3, [3, 3, 0, 1])
    assert store.batch_throughput(row.seq, 10) == (int(T0), 1, [1, 1, 1, 1, 1, 1, 0, 0, 0, 1])


def test_a_deleted_batch_takes_its_throughput_with_it(db_path):
    store = open_store(db_path)
    row = submit(store, 2)
    end(store, 2, T0)
    store.batch_delete(row.id, "t", T0 + 1)
    assert store._one("SELECT count(*) FROM batch_ticks")[0] == 0


def test_a_rescued_item_that_runs_out_of_attempts_counts_as_ended(db_path):
    store = open_store(db_path)
    row = submit(store, 1)
    store.items_claim("k", 1, "o", T0, lease_s=30)
    assert store.items_rescue(T0 + 31) == 1
    assert store.batch_get(row.id).metrics.failed == 1
    assert store.batch_throughput(row.seq, 60) == (int(T0 + 31), 1, [1])


def _endpoint_delivery(store: Store, endpoint_id: str, outcome: int | None,
                       now: float, retry_at: float | None = None) -> None:
    """One batch.completed delivery to the endpoint, attempted once: `outcome` is the
    status code (None: a connection error), `retry_at` when the next attempt is due."""
    row = submit(store, 1)
    end(store, 1, now)
    [claimed] = store.deliveries_claim(now, 100, 30)
    seq = claimed[0]
    failure = None if outcome == 200 else "http_status" if outcome else "connection"
    error = None if outcome == 200 else f"HTTP {outcome}" if outcome else "refused"
    store.deliveries_record([AttemptRecord(
        seq, 1, True, outcome, "body", 5, error, None, now,
        retry_at, failure, False)])
    assert store.batch_get(row.id).status == "completed"


@pytest.fixture
def endpoint(db_path):
    store = open_store(db_path)
    made = store.endpoint_create("t", "hooks", "https://hooks.example/x", ["batch.completed"],
                                 "secret_1", "whsec_x", T0)
    return store, made.id


def test_endpoint_health_from_its_recent_deliveries(endpoint):
    store, endpoint_id = endpoint
    assert store.endpoint_health(endpoint_id) == {
        "recent": 0, "ended": 0, "succeeded": 0, "last_error": None,
        "last_error_status": None, "last_error_at": None, "next_attempt_at": None}
    _endpoint_delivery(store, endpoint_id, 200, T0)
    _endpoint_delivery(store, endpoint_id, 500, T0 + 1)
    _endpoint_delivery(store, endpoint_id, 200, T0 + 2)
    _endpoint_delivery(store, endpoint_id, None, T0 + 3, retry_at=T0 + 60)
    health = store.endpoint_health(endpoint_id)
    assert health == {"recent": 4, "ended": 3, "succeeded": 2, "last_error": "refused",
                      "last_error_status": None, "last_error_at": T0 + 3,
                      "next_attempt_at": T0 + 60}


def test_endpoint_health_looks_at_the_most_recent_window_only(endpoint, monkeypatch):
    monkeypatch.setattr(views_module, "HEALTH_WINDOW", 2)
    store, endpoint_id = endpoint
    _endpoint_delivery(store, endpoint_id, 500, T0)
    _endpoint_delivery(store, endpoint_id, 200, T0 + 1)
    _endpoint_delivery(store, endpoint_id, 200, T0 + 2)
    health = store.endpoint_health(endpoint_id)
    assert (health["recent"], health["ended"], health["succeeded"]) == (2, 2, 2)
    assert health["last_error"] is None


def test_sessions_expire_and_sign_in_clears_the_expired(db_path):
    store = open_store(db_path)
    store.session_create(b"a", b"key-a", "csrf-a", T0, T0 + 10)
    assert store.session_get(b"a", T0 + 9.9) == (b"key-a", "csrf-a")
    assert store.session_get(b"a", T0 + 10) is None
    assert store.session_get(b"b", T0) is None
    store.session_create(b"b", b"key-b", "csrf-b", T0 + 10, T0 + 20)
    assert store._all("SELECT token_hash FROM ui_sessions") == [(b"b",)]
    store.session_delete(b"b")
    assert store.session_get(b"b", T0 + 11) is None
