"""The store on a real SQLite file: leases, rescue, migrations, one-transaction writes."""

from __future__ import annotations

import apsw
import pytest

from minibatch.errors import InvalidInput
from minibatch.store import MIGRATIONS, Outcome, Store, open_store

T0 = 1_000_000.0


def make_batch(store: Store, n: int = 3, max_attempts: int = 2, **kw) -> str:
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": i} for i in range(n)],
                             now=T0, max_attempts=max_attempts, **kw)
    return row.id


def test_completion_from_a_lost_lease_is_discarded(db_path):
    store = open_store(db_path)
    batch_id = make_batch(store, n=1)
    [first] = store.items_claim("k", 10, "owner-a", T0, lease_s=30)
    assert store.items_rescue(T0 + 31) == 1  # lease lapsed: back to the queue
    [second] = store.items_claim("k", 10, "owner-b", T0 + 32, lease_s=30)
    assert second.item.attempt == 2
    late = Outcome(first.seq, first.batch_seq, first.token, "succeeded", b'"late"', None, 0.0)
    assert store.items_finish([late], "owner-a", T0 + 33) == 0
    on_time = Outcome(second.seq, second.batch_seq, second.token, "succeeded", b'"ok"', None,
                      0.0)
    assert store.items_finish([on_time], "owner-b", T0 + 34) == 1
    batch = store.batch_get(batch_id)
    assert batch.status == "completed" and batch.metrics.succeeded == 1
    assert store.results_page(second.batch_seq, -1, 10)[0][4] == b'"ok"'


def test_a_write_of_outcomes_with_one_lease_lost_applies_and_counts_only_the_others(db_path):
    """One write of three outcomes, one of whose leases another owner holds now: the two
    still held are written and counted once each, the lost one changes nothing."""
    store = open_store(db_path)
    batch_id = make_batch(store, n=3)
    [lost] = store.items_claim("k", 1, "owner-a", T0, lease_s=10)
    held = store.items_claim("k", 2, "owner-a", T0 + 5, lease_s=30)
    assert store.items_rescue(T0 + 11) == 1  # only the first claim's lease has lapsed
    [again] = store.items_claim("k", 10, "owner-b", T0 + 12, lease_s=30)
    assert again.seq == lost.seq
    outcomes = [Outcome(c.seq, c.batch_seq, c.token, "succeeded", b'"a"', None, 0.0)
                for c in (lost, *held)]
    assert store.items_finish(outcomes, "owner-a", T0 + 13) == 2
    m = store.batch_get(batch_id).metrics
    assert (m.succeeded, m.running, m.queued) == (2, 1, 0)
    rows = {r[1]: r for r in store.results_page(lost.batch_seq, -1, 10)}
    assert lost.seq not in rows and all(rows[c.seq][4] == b'"a"' for c in held)
    mine = Outcome(again.seq, again.batch_seq, again.token, "succeeded", b'"b"', None, 0.0)
    assert store.items_finish([mine], "owner-b", T0 + 14) == 1
    batch = store.batch_get(batch_id)
    assert batch.status == "completed" and batch.metrics.succeeded == 3


def test_rescue_counts_the_attempt_and_fails_past_max_attempts(db_path):
    store = open_store(db_path)
    batch_id = make_batch(store, n=1, max_attempts=2)
    for attempt in (1, 2):
        [claimed] = store.items_claim("k", 10, "o", T0 + attempt * 100, lease_s=30)
        assert claimed.item.attempt == attempt
        store.items_rescue(T0 + attempt * 100 + 31)
    batch = store.batch_get(batch_id)
    assert batch.status == "failed" and batch.metrics.failed == 1
    [row] = store.results_page(claimed.batch_seq, -1, 10)
    assert b"lease_expired" in row[5]


def test_heartbeat_keeps_a_long_attempt_from_being_rescued(db_path):
    store = open_store(db_path)
    make_batch(store, n=2)
    store.items_claim("k", 10, "o", T0, lease_s=30)
    store.leases_extend("o", T0 + 60)
    assert store.items_rescue(T0 + 45) == 0
    assert store.items_rescue(T0 + 61) == 2


def test_a_kind_another_process_serves_is_left_to_it_while_its_lease_lives(db_path):
    """Processes sharing a database may serve different kinds: one starting without a
    kind's handler fails that kind's batches only once no live process leases the kind."""
    store = open_store(db_path)
    served = store.batch_insert(tenant="t", kind="embed", items=[{"input": 0}], now=T0,
                                max_attempts=1)
    assert store.leases_extend("elsewhere", T0 + 30, ["embed", "k"]) == 0  # no items run
    assert store.batches_fail_unknown_kinds(["echo"], T0 + 1) == []
    store.leases_extend("elsewhere", T0 + 60, ["embed"])  # a heartbeat: the lease goes on
    assert store.batches_fail_unknown_kinds(["echo"], T0 + 45) == []
    assert store.batches_fail_unknown_kinds(["echo"], T0 + 60) == [served.id]  # it ran out
    assert store.batch_get(served.id).status == "failed"


def test_an_owner_that_hands_its_items_back_serves_no_kind_any_more(db_path):
    store = open_store(db_path)
    served = store.batch_insert(tenant="t", kind="embed", items=[{"input": 0}], now=T0,
                                max_attempts=1)
    store.leases_extend("leaving", T0 + 30, ["embed"])
    store.leases_extend("staying", T0 + 30, ["other"])
    store.items_release("leaving", T0 + 1)
    assert store.batches_fail_unknown_kinds(["echo"], T0 + 2) == [served.id]


def test_an_owner_known_dead_serves_no_kind_any_more(db_path):
    store = open_store(db_path)
    served = store.batch_insert(tenant="t", kind="embed", items=[{"input": 0}], now=T0,
                                max_attempts=1)
    store.leases_extend("dead", T0 + 30, ["embed"])
    store.leases_expire("dead")
    assert store.batches_fail_unknown_kinds(["echo"], T0 + 1) == [served.id]


def test_claim_respects_run_at_and_the_limit(db_path):
    store = open_store(db_path)
    make_batch(store, n=5)
    assert store.items_claim("k", 2, "o", T0 - 1, lease_s=30) == []  # not due yet
    assert len(store.items_claim("k", 2, "o", T0, lease_s=30)) == 2
    assert len(store.items_claim("other", 10, "o", T0, lease_s=30)) == 0
    assert len(store.items_claim("k", 10, "o", T0, lease_s=30)) == 3


@pytest.mark.sqlite_only
def test_submit_is_one_transaction_with_a_few_executemany_calls(db_path):
    store = open_store(db_path)
    statements = []
    store.conn.exec_trace = lambda cursor, sql, bindings: statements.append(sql) or True
    make_batch(store, n=20_000)
    store.conn.exec_trace = None
    assert statements.count("BEGIN IMMEDIATE") == 1 and statements.count("COMMIT") == 1
    assert store._one("SELECT count(*) FROM items")[0] == 20_000


def test_a_submit_refuses_the_first_bad_item_by_index_whatever_is_wrong_with_it(db_path):
    """Items are converted a chunk at a time; a chunk with a bad item is gone through in
    order, so a duplicate entry_id before an item that is not a dict is the one named."""
    store = open_store(db_path)
    items = [{"input": 0, "entry_id": "a"}, {"input": 1, "entry_id": "a"}, 5]
    with pytest.raises(InvalidInput, match="duplicate entry_id 'a' at item 1"):
        store.batch_insert(tenant="a", kind="k", items=items, now=T0, max_attempts=2)
    with pytest.raises(InvalidInput, match="item 1 must be a dict"):
        store.batch_insert(tenant="a", kind="k", items=items[:1] + items[2:] + items[1:2],
                           now=T0, max_attempts=2)
    assert store._one("SELECT count(*) FROM items")[0] == 0


@pytest.mark.sqlite_only
def test_a_write_of_outcomes_whose_leases_all_hold_is_written_once(db_path):
    """The common case writes each outcome once, without RETURNING rows: only a write
    that finds a lease lost is undone and written again."""
    store = open_store(db_path)
    make_batch(store, n=5)
    claimed = store.items_claim("k", 10, "o", T0, lease_s=30)
    statements = []
    store.conn.exec_trace = lambda cursor, sql, bindings: statements.append(sql) or True
    written = store.items_finish([Outcome(c.seq, c.batch_seq, c.token, "succeeded", b"1",
                                          None, 0.0) for c in claimed], "o", T0 + 1)
    store.conn.exec_trace = None
    assert written == 5
    writes = [sql for sql in statements if sql.startswith("UPDATE items SET status=?")]
    assert len(writes) == 5 and not any("RETURNING" in sql for sql in writes)
    assert statements.count("ROLLBACK") == 0


def test_fresh_and_upgraded_databases_have_the_same_schema(tmp_path):
    old = apsw.Connection(str(tmp_path / "old.db"))
    old.execute(MIGRATIONS[0] + "PRAGMA user_version=1;")
    old.close()
    upgraded = open_store(str(tmp_path / "old.db"))
    fresh = open_store(str(tmp_path / "fresh.db"))
    assert upgraded.schema_version() == fresh.schema_version() == len(MIGRATIONS)
    assert upgraded.schema_sql() == fresh.schema_sql()
    open_store(str(tmp_path / "fresh.db"))  # opening again applies nothing and fails nothing


@pytest.mark.sqlite_only
def test_database_is_in_wal_mode(db_path):
    store = open_store(db_path)
    assert store._one("PRAGMA journal_mode")[0] == "wal"


def test_synchronous_setting_reaches_sqlite(tmp_path):
    assert open_store(str(tmp_path / "n.db"))._one("PRAGMA synchronous")[0] == 1  # NORMAL
    full = open_store(str(tmp_path / "f.db"), synchronous="full")
    assert full._one("PRAGMA synchronous")[0] == 2


def test_an_item_failed_by_lease_expiry_sends_its_item_failed_event(db_path):
    """Found by bench/chaos.py: only items_finish emitted item events, not the rescuer."""
    from minibatch.models import WebhookIn

    store = open_store(db_path)
    batch_id = make_batch(store, n=1, max_attempts=1, webhook=WebhookIn(
        url="https://hooks.example/x", events=["item.failed", "batch.failed"]))
    store.items_claim("k", 10, "o", T0, lease_s=30)
    store.items_rescue(T0 + 31)
    deliveries = store.deliveries_page(store.batch_seq(batch_id, None), limit=100, after=None)[0]
    assert [d.event for d in deliveries] == ["item.failed", "batch.failed"]
    assert '"lease_expired"' in deliveries[0].payload_bytes


def test_a_handed_back_attempt_cannot_complete_the_next_claim_of_the_same_owner(db_path):
    """Found by the property test: after items_release the item is claimed again with the
    same attempt number (and here the same owner), so only a per-claim token tells the
    two claims apart."""
    store = open_store(db_path)
    batch_id = make_batch(store, n=1, max_attempts=1)
    [first] = store.items_claim("k", 1, "w1", T0, lease_s=10)
    store.items_release("w1", T0 + 1)
    [second] = store.items_claim("k", 1, "w1", T0 + 2, lease_s=10)
    assert first.item.attempt == second.item.attempt == 1
    stale = Outcome(first.seq, first.batch_seq, first.token, "failed", None,
                    b'{"code":"x","message":"stale"}', 0.0)
    assert store.items_finish([stale], "w1", T0 + 3) == 0
    fresh = Outcome(second.seq, second.batch_seq, second.token, "succeeded", b"1", None, 0.0)
    assert store.items_finish([fresh], "w1", T0 + 4) == 1
    assert store.batch_get(batch_id).status == "completed"


def test_settings_refuse_nan_and_infinite_numbers():
    import pytest

    from minibatch.config import make_settings
    from minibatch.errors import InvalidInput

    for bad in ({"lease_s": float("nan")}, {"webhook_timeout_s": float("inf")},
                {"webhook_retry_schedule": "0,nan"}, {"webhook_retry_schedule": "inf"}):
        with pytest.raises(InvalidInput):
            make_settings(**bad)


def test_manual_retry_keeps_automatic_attempts_and_refuses_one_in_flight(db_path):
    """Found in review: a manual retry of a pending delivery dropped its remaining
    automatic attempts, and one during an attempt in flight sent it twice."""
    import pytest

    from minibatch.delivery import AttemptRecord
    from minibatch.errors import Conflict
    from minibatch.models import WebhookIn

    store = open_store(db_path, webhook_schedule=(0.0, 60.0, 60.0))
    batch_id = make_batch(store, n=1, webhook=WebhookIn(url="https://hooks.example/x"))
    [c] = store.items_claim("k", 1, "o", T0, lease_s=30)
    store.items_finish([Outcome(c.seq, c.batch_seq, c.token, "succeeded", b"1", None, 0.0)],
                       "o", T0)
    [row] = store.deliveries_claim(T0, 10, lease_s=20)
    seq, msg_id = row[0], row[1]
    with pytest.raises(Conflict):
        store.delivery_redeliver(msg_id, None, T0 + 1)

    def record(attempt: int, automatic: bool, at: float) -> None:
        store.deliveries_record([AttemptRecord(seq, attempt, automatic, 500, "no", 5,
                                               "HTTP 500", None, at, at + 60, "http_status",
                                               False)])

    record(1, True, T0 + 2)
    manual = store.delivery_redeliver(msg_id, None, T0 + 3)
    assert manual.status == "pending" and not manual.is_automatic
    assert manual.max_attempts == 3  # the automatic attempts left are kept
    [again] = store.deliveries_claim(T0 + 3, 10, lease_s=20)
    assert again[8] == 0  # this attempt is the manual one
    record(2, False, T0 + 4)
    [d] = store.deliveries_page(store.batch_seq(batch_id, None), limit=100, after=None)[0]
    assert d.status == "pending" and d.is_automatic and d.attempt_count == 2
    assert [a.is_automatic for a in d.attempts] == [True, False]
