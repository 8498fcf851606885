"""The store as a whole, one method at a time: its backup and its checks (maintenance.py),
deleting batches and files and pruning their rows a chunk at a time (retention.py), the
/metrics totals, a second connection, the checkpoint and the wait for the write lock.

Pinned where mutation testing found that only integration tests (not in the store's map)
noticed a change. Each test drives a real store (`open_store(db_path)`: a SQLite file in
tmp_path, or a PostgreSQL database under MINIBATCH_TEST_STORE=postgres) under an injected
clock; what only a SQLite file has (its backup, pragmas, WAL, corruption, locks) is marked
`sqlite_only`. Rows are set by SQL only to make a drift or a corruption that `check()`
must report.

Equivalent:
- maintenance.py `backup.step(-1)` -> `step(-2)` or `step(~1)`: SQLite copies every
  remaining page for any negative count.
- maintenance.py `row[0]` -> `row[-1]` (integrity_check): its rows have one column.
- maintenance.py `zip(..., strict=True)` -> `strict=False`: a batch row always has the six
  counters.
- maintenance.py `kept.get(status, 0)` -> `kept.get(status, -1)` in the comparison: a
  status missing from `kept` is one stored at least once, so it differs from 0 and -1
  alike, and the message reads `kept.get(status, 0)`.
- retention.py `r[0]` / `doomed[0]` -> `[-1]`: one-column rows.
- retention.py `removed >= chunk` -> `removed == chunk`, and `removed < chunk` ->
  `removed != chunk`: each DELETE is limited to what is left of the chunk, so `removed`
  never passes it (the `is` / `is not` variants are killed with a chunk of 300).
"""

from __future__ import annotations

import os

import apsw
import pytest

from minibatch.delivery import AttemptRecord
from minibatch.errors import Conflict, NotFound, StorageUnavailable
from minibatch.models import WebhookIn
from minibatch.store import BatchRow, Outcome, SqliteStore, Store, error_bytes, open_store
from minibatch.store.base import _wait_briefly

T0 = 1_000_000.0
HOOK = "https://hooks.example/x"


def submit(store: Store, n: int = 1, *, tenant: str = "t", **kw) -> BatchRow:
    return store.batch_insert(tenant=tenant, kind="k", items=[{"input": i} for i in range(n)],
                              now=T0, max_attempts=1, **kw)


def run_items(store: Store, limit: int, status: str = "succeeded", *,
              now: float = T0) -> list:
    """Claim up to `limit` items and end each with `status` at `now`."""
    claimed = store.items_claim("k", limit, "o", now, lease_s=30)
    error = None if status == "succeeded" else error_bytes("boom", "it broke")
    output = b"1" if status == "succeeded" else None
    store.items_finish([Outcome(c.seq, c.batch_seq, c.token, status, output, error, 0.0)
                        for c in claimed], "o", now)
    return claimed


def record(store: Store, seq: int, *, retry_at: float | None = None,
           ok: bool = False, at: float = T0 + 1) -> None:
    """One automatic attempt of delivery `seq`: a success, or a 500 that is retried at
    `retry_at` (None: the last attempt, so the delivery fails)."""
    store.deliveries_record([AttemptRecord(
        seq, 1, True, 200 if ok else 500, "body", 5, None if ok else "HTTP 500", None, at,
        None if ok else retry_at, None if ok else "http_status", False)])


def left_of(store: Store, seq: int) -> tuple[int, int, int, int]:
    """(items, deliveries, attempts, doomed) rows left of batch `seq`."""
    one = store._one
    return (one("SELECT count(*) FROM items WHERE batch=?", (seq,))[0],
            one("SELECT count(*) FROM deliveries WHERE batch=?", (seq,))[0],
            one("SELECT count(*) FROM attempts WHERE delivery IN (SELECT seq FROM"
                " deliveries WHERE batch=?)", (seq,))[0],
            one("SELECT count(*) FROM doomed WHERE batch=?", (seq,))[0])


def file_with_lines(store: Store, n: int, tenant: str = "t") -> str:
    file_id = store.file_begin(tenant, "in.jsonl", 10, T0)
    store.file_lines_insert(file_id, [(line, None, b"1", None, None, None)
                                      for line in range(1, n + 1)])
    store.file_finish(file_id, n)
    return file_id


# -- backup_to ----------


@pytest.mark.sqlite_only
def test_a_backup_is_a_whole_database_in_wal_mode(tmp_path):
    store = open_store(str(tmp_path / "jobs.db"))
    row = submit(store, 300)
    run_items(store, 120)
    dest = str(tmp_path / "copy.db")
    pages = store.backup_to(dest)
    assert pages == store._one("PRAGMA page_count")[0] > 10
    copy = open_store(dest)
    assert copy._one("PRAGMA journal_mode")[0] == "wal"
    assert copy._one("PRAGMA page_count")[0] == pages
    assert copy.batch_get(row.id).metrics.succeeded == 120
    assert copy._one("SELECT count(*) FROM items")[0] == 300
    assert copy.check() == []


@pytest.mark.sqlite_only
def test_a_backup_that_cannot_be_written_is_a_storage_fault(tmp_path):
    store = open_store(str(tmp_path / "jobs.db"))
    with pytest.raises(StorageUnavailable, match="cannot write"):
        store.backup_to(str(tmp_path / "no-such-dir" / "copy.db"))
    (tmp_path / "junk.db").write_bytes(b"not a database " * 500)
    with pytest.raises(StorageUnavailable, match="failed"):
        store.backup_to(str(tmp_path / "junk.db"))


# -- check ----------


def busy_store(db_path: str) -> Store:
    """A store with a batch past Python's cached integers (300 items) and deliveries in
    every status: pending, sending, succeeded and failed."""
    store = open_store(db_path, webhook_schedule=(0.0, 60.0))
    submit(store, 300, webhook=WebhookIn(url=HOOK, events=["item.succeeded"]))
    run_items(store, 4)
    seqs = [d[0] for d in store.deliveries_claim(T0, 3, lease_s=30)]
    record(store, seqs[0], ok=True)
    record(store, seqs[1], retry_at=None)
    return store


def test_a_consistent_database_has_no_problems(db_path):
    store = busy_store(db_path)
    assert store.check() == []
    run_items(store, 296, now=T0 + 2)  # the batch completes
    assert store.check() == []


def test_check_reports_counters_that_drifted_from_the_items(db_path):
    store = busy_store(db_path)
    row = store.batch_row(store._one("SELECT id FROM batches")[0], None)
    store.conn.execute("UPDATE batches SET succeeded=succeeded-1")
    assert store.check() == [
        f"batch {row.id}: metrics.succeeded is 3, its items say 4",
        f"batch {row.id}: metrics add up to 299, not its total 300",
    ]
    store.conn.execute("UPDATE batches SET failed=7")
    assert store.check() == [
        f"batch {row.id}: metrics.succeeded is 3, its items say 4",
        f"batch {row.id}: metrics.failed is 7, its items say 0",
        f"batch {row.id}: metrics add up to 306, not its total 300",
    ]


def test_check_reports_an_ended_batch_with_items_queued_or_running(db_path):
    store = open_store(db_path)
    submit(store, 1)
    run_items(store, 1)  # completed, as it should be
    running = submit(store, 1)
    store.items_claim("k", 1, "o", T0, lease_s=30)
    queued = submit(store, 1)
    store.conn.execute("UPDATE batches SET status='completed', completed_at=? WHERE seq"
                       " IN (?,?)", (T0, running.seq, queued.seq))
    assert store.check() == [
        f"batch {running.id} is completed with items queued or running",
        f"batch {queued.id} is completed with items queued or running",
    ]


def test_check_reports_delivery_counts_that_drifted_either_way(db_path):
    store = busy_store(db_path)
    counts = dict(store.conn.execute("SELECT status, n FROM delivery_counts"))
    assert counts == {"pending": 1, "sending": 1, "succeeded": 1, "failed": 1}
    store.conn.execute("UPDATE delivery_counts SET n=n+1 WHERE status='sending'")
    store.conn.execute("UPDATE delivery_counts SET n=0 WHERE status='pending'")
    store.conn.execute("INSERT INTO delivery_counts VALUES ('cancelled', -1), ('expired', 1)")
    assert store.check() == [
        "deliveries cancelled: counted -1, stored 0",
        "deliveries expired: counted 1, stored 0",
        "deliveries pending: counted 0, stored 1",
        "deliveries sending: counted 2, stored 1",
    ]


@pytest.mark.sqlite_only
def test_check_reports_what_sqlites_integrity_check_finds(db_path):
    """Two indexes redefined behind SQLite's back: one no longer matches its rows ("row
    .. missing"), one is now unique over duplicates ("non-unique entry")."""
    store = open_store(db_path)
    store.tenant_create("t", b"k1", "secret_1", "whsec_eA", T0, key_id="key_1")
    store.tenant_create("t", b"k2", "secret_2", "whsec_eA", T0, key_id="key_2")
    store.conn.execute("PRAGMA writable_schema=ON")
    store.conn.execute("UPDATE sqlite_master SET sql='CREATE INDEX api_keys_id ON"
                       " api_keys(tenant)' WHERE name='api_keys_id'")
    store.conn.execute("UPDATE sqlite_master SET sql='CREATE UNIQUE INDEX api_keys_tenant"
                       " ON api_keys(tenant, created_at)' WHERE name='api_keys_tenant'")
    store.close()
    store = open_store(db_path)
    problems = store.check()
    assert sorted(problems) == [
        "integrity: non-unique entry in index api_keys_tenant",
        "integrity: row 1 missing from index api_keys_id",
        "integrity: row 2 missing from index api_keys_id",
    ]


@pytest.mark.sqlite_only
def test_check_of_a_database_that_cannot_be_read_says_so(db_path):
    store = open_store(db_path)
    submit(store, 300)
    root = store._one("SELECT rootpage FROM sqlite_master WHERE name='items'")[0]
    size = store._one("PRAGMA page_size")[0]
    store.close()  # the last connection: the WAL goes into the file
    with open(db_path, "r+b") as f:
        f.seek((root - 1) * size)
        f.write(b"\xff" * size)
    store = open_store(db_path)
    assert store.check() == ["the database cannot be read: database disk image is malformed"]


# -- counts ----------


def test_counts_show_items_and_deliveries_by_public_status(db_path):
    store = open_store(db_path, webhook_schedule=(0.0, 60.0))
    submit(store, 7, webhook=WebhookIn(url=HOOK, events=["item.succeeded", "item.failed"]))
    run_items(store, 4)
    run_items(store, 1, "failed")
    store.items_claim("k", 1, "o", T0, lease_s=30)  # one running, one queued
    seqs = [d[0] for d in store.deliveries_claim(T0, 10, lease_s=30)]
    assert len(seqs) == 5
    record(store, seqs[0], ok=True)
    record(store, seqs[1], retry_at=None)
    # 'pending' now counts 0 (all were claimed): it is left out; 'sending' shows as pending
    assert store.counts() == {
        "items": {"queued": 1, "running": 1, "succeeded": 4, "failed": 1, "cancelled": 0,
                  "expired": 0},
        "deliveries": {"pending": 3, "succeeded": 1, "failed": 1},
    }
    record(store, seqs[2], retry_at=T0 + 60)  # pending 1 and sending 2: one total
    assert store.counts()["deliveries"] == {"pending": 3, "succeeded": 1, "failed": 1}


# -- batch_delete and its pruning ----------


def test_a_batch_that_has_not_ended_cannot_be_deleted(db_path):
    store = open_store(db_path)
    row = submit(store, 2)
    run_items(store, 1)
    with pytest.raises(Conflict):
        store.batch_delete(row.id, "t", T0 + 1)
    store.batch_cancel(row.id, None, T0 + 1)  # queued items end now: cancelled
    with pytest.raises(NotFound):
        store.batch_delete(row.id, "other", T0 + 2)
    store.batch_delete(row.id, "t", T0 + 2)
    with pytest.raises(NotFound):
        store.batch_get(row.id)


def test_deleting_a_batch_ends_its_deliveries_still_to_send_and_keeps_the_rest(db_path):
    store = open_store(db_path, webhook_schedule=(0.0, 60.0))
    row = submit(store, 4, webhook=WebhookIn(url=HOOK, events=["item.succeeded"]))
    other = submit(store, 1, webhook=WebhookIn(url=HOOK, events=["item.succeeded"]))
    run_items(store, 5)
    claimed = [d for d in store.deliveries_claim(T0, 10, lease_s=30) if d[7] == row.seq]
    succeeded, retried, sending = (d[0] for d in claimed[:3])
    record(store, succeeded, ok=True, at=T0 + 1)
    record(store, retried, retry_at=T0 + 60, at=T0 + 1)  # pending again; 2 still sending
    store.batch_delete(row.id, None, T0 + 5)

    def ends(seq: int) -> tuple:
        return tuple(store._one("SELECT status, failure_reason_code, next_attempt_at,"
                                " completed_at FROM deliveries WHERE seq=?", (seq,)))

    assert ends(succeeded) == ("succeeded", None, None, T0 + 1)
    assert ends(retried) == ends(sending) == ("failed", "batch_deleted", None, T0 + 5)
    assert store._one("SELECT count(*) FROM deliveries WHERE batch=? AND status='failed'"
                      " AND failure_reason_code='batch_deleted'", (row.seq,))[0] == 3
    assert [d[7] for d in store.deliveries_claim(T0 + 100, 10, lease_s=30)] == [other.seq]
    assert store.counts()["deliveries"] == {"pending": 1, "succeeded": 1, "failed": 3}
    assert store.check() == []


def test_deleting_a_batch_removes_its_generated_files_at_once(db_path):
    store = open_store(db_path)
    row = submit(store, 2, dialect="openai")
    run_items(store, 1)
    run_items(store, 1, "failed")
    files = store.batch_files(row.seq)
    assert set(files) == {"batch_output", "batch_error"}
    store.file_part_insert(files["batch_output"], 0, b"x")
    kept = file_with_lines(store, 1)
    store.batch_delete(row.id, "t", T0 + 1)
    assert store.batch_files(row.seq) == {}
    for file_id in files.values():
        with pytest.raises(NotFound):
            store.file_get(file_id, "t")
    assert store.file_parts_page(files["batch_output"], -1, 10) == []
    assert store.file_get(kept, "t").lines == 1


def test_a_deleted_batchs_rows_go_a_chunk_per_prune_items_then_attempts_then_deliveries(
        db_path):
    """6 items, 7 deliveries (6 item events and the batch's end), 3 attempts: 16 rows,
    then the doomed row itself."""
    store = open_store(db_path)
    row = submit(store, 6, webhook=WebhookIn(url=HOOK, events=["item.succeeded",
                                                               "batch.completed"]))
    run_items(store, 6)
    for d in store.deliveries_claim(T0, 3, lease_s=30):
        record(store, d[0], ok=True)
    assert left_of(store, row.seq) == (6, 7, 3, 0)
    store.batch_delete(row.id, "t", T0 + 2)
    assert left_of(store, row.seq) == (6, 7, 3, 1)
    assert store.doomed_prune(5) == 5
    assert left_of(store, row.seq) == (1, 7, 3, 1)
    assert store.doomed_prune(5) == 5  # the last item, the 3 attempts, one delivery
    assert left_of(store, row.seq) == (0, 6, 0, 1)
    assert store.doomed_prune(5) == 5
    assert left_of(store, row.seq) == (0, 1, 0, 1)
    assert store.doomed_prune(5) == 2  # the last delivery and the doomed row
    assert left_of(store, row.seq) == (0, 0, 0, 0)
    assert store.doomed_prune(5) == 0
    assert store.check() == []


def test_a_prune_that_removes_exactly_a_chunk_leaves_the_doomed_row_for_the_next(db_path):
    store = open_store(db_path)
    row = submit(store, 4)
    run_items(store, 4)
    store.batch_delete(row.id, None, T0 + 1)
    assert store.doomed_prune(4) == 4
    assert left_of(store, row.seq) == (0, 0, 0, 1)
    assert store.doomed_prune(4) == 1
    assert left_of(store, row.seq) == (0, 0, 0, 0)
    assert store.doomed_prune(4) == 0


def test_a_prune_takes_what_is_left_of_its_chunk_from_the_next_table(db_path):
    """5 items, 5 deliveries with an attempt each: chunks of 4 take 4 items; the last item
    and 3 attempts; 2 attempts and 2 deliveries; the last 3 deliveries and the doom."""
    store = open_store(db_path)
    row = submit(store, 5, webhook=WebhookIn(url=HOOK, events=["item.succeeded"]))
    run_items(store, 5)
    for d in store.deliveries_claim(T0, 10, lease_s=30):
        record(store, d[0], ok=True)
    store.batch_delete(row.id, "t", T0 + 2)
    assert left_of(store, row.seq) == (5, 5, 5, 1)
    assert store.doomed_prune(4) == 4 and left_of(store, row.seq) == (1, 5, 5, 1)
    assert store.doomed_prune(4) == 4 and left_of(store, row.seq) == (0, 5, 2, 1)
    assert store.doomed_prune(4) == 4 and left_of(store, row.seq) == (0, 3, 0, 1)
    assert store.doomed_prune(4) == 4 and left_of(store, row.seq) == (0, 0, 0, 0)
    assert store.doomed_prune(4) == 0


def test_a_prune_of_a_chunk_past_pythons_cached_integers_stops_at_the_chunk(db_path):
    """chunk=300, as `removed` counted up to it is another int object than `chunk`."""
    store = open_store(db_path)
    row = submit(store, 301)
    run_items(store, 301)
    file_id = file_with_lines(store, 301)
    store.batch_delete(row.id, "t", T0 + 1)
    store.file_delete(file_id, "t")
    assert store.doomed_prune(300) == 300 and left_of(store, row.seq) == (1, 0, 0, 1)
    assert store.doomed_prune(300) == 2 and left_of(store, row.seq) == (0, 0, 0, 0)
    assert store.doomed_prune(300) == 300
    assert store._one("SELECT count(*) FROM doomed_files")[0] == 1
    assert store.doomed_prune(300) == 2
    assert store._one("SELECT count(*) FROM doomed_files")[0] == 0
    assert store.doomed_prune(300) == 0


def test_batches_that_ended_before_a_time_are_deleted_oldest_first_up_to_a_limit(db_path):
    store = open_store(db_path)
    late = submit(store)  # the lower seq, but it ends last
    run_items(store, 1, now=T0 + 30)
    early = submit(store)
    run_items(store, 1, now=T0 + 10)
    middle = submit(store)
    run_items(store, 1, now=T0 + 20)
    running = submit(store)
    store.items_claim("k", 1, "o", T0, lease_s=30)

    def alive() -> set[str]:
        return {r[0] for r in store.conn.execute("SELECT id FROM batches")}

    assert store.batches_delete_ended(T0 + 30, 1, T0 + 40) == 1
    assert alive() == {late.id, middle.id, running.id}
    assert store.batches_delete_ended(T0 + 30, 10, T0 + 40) == 1  # `late` ended at, not before
    assert alive() == {late.id, running.id}
    assert store.batches_delete_ended(T0 + 10, 10, T0 + 40) == 0
    assert store._one("SELECT count(*) FROM doomed")[0] == 2
    while store.doomed_prune(100):
        pass
    assert left_of(store, early.seq)[0] == left_of(store, middle.seq)[0] == 0
    assert left_of(store, late.seq)[0] == 1


def test_a_deleted_file_is_gone_at_once_and_its_lines_go_a_chunk_per_prune(db_path):
    store = open_store(db_path)
    file_id = file_with_lines(store, 5)
    store.file_part_insert(file_id, 0, b"x")
    other = file_with_lines(store, 2)
    made = store.batch_insert(tenant="t", kind="k", items=[], input_file_id=file_id,
                              now=T0, max_attempts=1)
    with pytest.raises(NotFound):
        store.file_delete(file_id, "other")
    store.file_delete(file_id, "t")
    with pytest.raises(NotFound):
        store.file_get(file_id, "t")
    assert store.file_parts_page(file_id, -1, 10) == []

    def lines_left() -> tuple[int, int]:
        return (store._one("SELECT count(*) FROM file_lines WHERE file=?", (file_id,))[0],
                store._one("SELECT count(*) FROM doomed_files")[0])

    assert lines_left() == (5, 1)
    assert store.doomed_prune(2) == 2 and lines_left() == (3, 1)
    assert store.doomed_prune(2) == 2 and lines_left() == (1, 1)
    assert store.doomed_prune(2) == 2 and lines_left() == (0, 0)  # a line and its doom
    assert store.doomed_prune(2) == 0
    assert store.file_get(other, "t").lines == 2
    assert store._one("SELECT count(*) FROM file_lines WHERE file=?", (other,))[0] == 2
    assert store.batch_get(made.id).metrics.total == 5  # the batch keeps its items


def test_a_deleted_file_of_whole_chunks_loses_its_doom_in_one_more_prune(db_path):
    store = open_store(db_path)
    file_id = file_with_lines(store, 4)
    store.file_delete(file_id, "t")
    assert [store.doomed_prune(2) for _ in range(4)] == [2, 2, 1, 0]


def test_deleted_batches_are_pruned_before_deleted_files(db_path):
    store = open_store(db_path)
    file_id = file_with_lines(store, 3)
    store.file_delete(file_id, "t")
    row = submit(store, 3)
    run_items(store, 3)
    store.batch_delete(row.id, "t", T0 + 1)
    assert store.doomed_prune(10) == 4  # the batch's 3 items and its doom
    assert store._one("SELECT count(*) FROM doomed_files")[0] == 1
    assert store.doomed_prune(10) == 4  # then the file's 3 lines and its doom
    assert store.doomed_prune(10) == 0


# -- the connection ----------


@pytest.mark.sqlite_only
def test_another_connection_is_to_the_same_file_with_the_same_settings(tmp_path):
    store = open_store(str(tmp_path / "jobs.db"), synchronous="full",
                        webhook_schedule=(5.0, 60.0))
    other = store.another()
    assert isinstance(other, SqliteStore) and other.path == store.path
    assert other._one("PRAGMA synchronous")[0] == 2
    assert (other.webhook_attempts, other.webhook_first_delay) == (2, 5.0)
    row = submit(store)
    assert other.batch_get(row.id).id == row.id
    other.close()
    assert open_store(":memory:").another() is None


@pytest.mark.sqlite_only
@pytest.mark.parametrize("relative", [False, True])
def test_a_checkpoint_copies_the_wal_into_the_database_file(tmp_path, monkeypatch, relative):
    """Whatever the path sorts like beside ":memory:" (`/...` before it, `jobs.db` after)."""
    monkeypatch.chdir(tmp_path)
    db_path = "jobs.db" if relative else str(tmp_path / "jobs.db")
    store = open_store(db_path)
    store.autocheckpoint(False)
    submit(store, 300)
    size = store._one("PRAGMA page_count")[0] * store._one("PRAGMA page_size")[0]
    assert os.path.getsize(db_path) < size  # the pages are in the WAL only
    store.checkpoint()
    assert os.path.getsize(db_path) == size
    assert store.another().path == db_path
    memory = open_store(":memory:")
    assert memory.checkpoint() is None and memory._checkpointer is None


def test_a_writer_looks_for_the_lock_every_millisecond_for_ten_seconds():
    assert _wait_briefly(0) is True
    assert _wait_briefly(9_999) is True
    assert _wait_briefly(10_000) is False
    assert _wait_briefly(10_001) is False


@pytest.mark.sqlite_only
def test_a_writer_that_must_not_wait_is_refused_at_once(db_path):
    from minibatch.errors import StoreBusy

    store = open_store(db_path)
    holder = apsw.Connection(db_path)
    holder.execute("BEGIN IMMEDIATE")
    store.wait_for_lock(False)
    with pytest.raises(StoreBusy):
        submit(store)
    holder.execute("ROLLBACK")
    submit(store)


@pytest.mark.sqlite_only
def test_a_database_that_cannot_be_opened_or_read_is_a_storage_fault(tmp_path):
    with pytest.raises(StorageUnavailable, match="cannot open"):
        open_store(str(tmp_path / "no-such-dir" / "jobs.db"))
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database file at all" * 200)
    with pytest.raises(StorageUnavailable, match="not a readable database"):
        open_store(str(junk))


@pytest.mark.sqlite_only
def test_an_in_memory_store_keeps_its_journal_in_memory_and_temp_tables_too():
    store = open_store(":memory:")
    assert store._one("PRAGMA journal_mode")[0] == "memory"
    assert store._one("PRAGMA temp_store")[0] == 2  # MEMORY
    assert store._one("PRAGMA synchronous")[0] == 1
    assert store.schema_version() > 1
    assert store.batch_get(submit(store).id).status == "queued"


@pytest.mark.sqlite_only
def test_closing_a_store_closes_its_checkpointer_too(db_path):
    store = open_store(db_path)
    store.checkpoint()
    checkpointer = store._checkpointer
    store.close()
    with pytest.raises(apsw.ConnectionClosedError):
        checkpointer.execute("SELECT 1")
    with pytest.raises(apsw.ConnectionClosedError):
        store.conn.execute("SELECT 1")
    open_store(":memory:").close()  # no checkpointer: nothing else to close


def test_a_write_that_fails_leaves_nothing_behind_and_the_next_one_works(db_path):
    store = open_store(db_path)
    with pytest.raises(RuntimeError), store._tx() as cur:
        cur.execute("INSERT INTO tenants VALUES ('t', 0)")
        raise RuntimeError("in the middle")
    assert store.conn.in_transaction is False
    assert store.tenant_exists("t") is False
    store.tenant_create("t", b"k", "secret_1", "whsec_eA", T0, key_id="key_1")
    assert store.tenant_exists("t") is True
