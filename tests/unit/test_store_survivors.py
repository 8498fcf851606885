"""The store, pinned where mutation testing (cosmic-ray, minibatch/store/ at eab3dd3) found
that no test noticed a change: secret rotation, files, cursors and pages, the claim's
rounds, delivery leases and summaries, event bodies and the connection's pragmas.

Each test drives a real SqliteStore on a real SQLite file under an injected clock.

Equivalent:
- interface.py 142 ReplaceBinaryOperator_Mul_Div: the `*` of `endpoint_update`'s signature
  in the `Store` Protocol; SqliteStore does not inherit the Protocol and its body is `...`,
  so nothing runs it.
- base.py 51 NumberReplacer, the variant `0` -> `-1`: SQLite treats any
  `wal_autocheckpoint` <= 0 as off (it reads back 0); the other variants are killed.
- endpoints.py 53 NumberReplacer, the variant `2**62` -> `2**61`: still above any seq SQLite
  hands out; the other variants (1**62, 3**62, 2**63) are killed.
"""

from __future__ import annotations

import msgspec
import pytest

from minibatch.delivery import AttemptRecord
from minibatch.errors import InvalidInput
from minibatch.models import WebhookIn, to_datetime
from minibatch.store import BatchRow, Outcome, SqliteStore, error_bytes

T0 = 1_000_000.0
HOOK = "https://hooks.example/x"


def submit(store: SqliteStore, n: int = 1, *, tenant: str = "t", **kw) -> BatchRow:
    return store.batch_insert(tenant=tenant, kind="k", items=[{"input": i} for i in range(n)],
                              now=T0, max_attempts=1, **kw)


def run_items(store: SqliteStore, limit: int, status: str = "succeeded", *,
              now: float = T0, run_at: float = 0.0) -> list:
    """Claim up to `limit` items and end each with `status`."""
    claimed = store.items_claim("k", limit, "o", now, lease_s=30)
    error = None if status == "succeeded" else error_bytes("boom", "it broke")
    output = b"1" if status == "succeeded" else None
    store.items_finish([Outcome(c.seq, c.batch_seq, c.token, status, output, error, run_at)
                        for c in claimed], "o", now)
    return claimed


def deliveries_of(store: SqliteStore, row: BatchRow) -> list:
    return store.deliveries_page(row.seq, limit=100, after=None)[0]


# -- accounts.py ----------


def test_a_rotated_secret_keeps_signing_for_exactly_the_overlap(db_path):
    store = SqliteStore(db_path)
    store.tenant_create("t", b"key", "secret_old", "whsec_b2xk", T0, key_id="key_1")
    assert store.secret_rotate("t", "secret_new", "whsec_bmV3", 600, T0) == ("secret_old",
                                                                          T0 + 600)
    assert [i for i, _ in store.secrets_active("t", T0 + 599)] == ["secret_new", "secret_old"]
    assert [i for i, _ in store.secrets_active("t", T0 + 600)] == ["secret_new"]


def test_finishing_a_file_stores_its_idempotency_key(db_path):
    store = SqliteStore(db_path)
    file_id = store.file_begin("t", "in.jsonl", 10, T0)
    store.file_finish(file_id, 2, idempotency=("key-1", b"hash", 200,
                                               lambda file: file.id.encode()))
    assert store.idempotency_get("t", "key-1", 0.0) == (b"hash", 200, file_id.encode())
    other = store.file_begin("t", "in.jsonl", 10, T0)
    assert store.file_finish(other, 1).lines == 1  # no key: nothing stored, nothing fails
    assert store.idempotency_get("t", "key-2", 0.0) is None


def test_discarding_a_file_goes_chunk_by_chunk_then_deletes_the_file(db_path):
    store = SqliteStore(db_path)
    file_id = store.file_begin("t", "in.jsonl", 10, T0)
    store.file_lines_insert(file_id, [(n, None, b"1", None, None, None) for n in (1, 2, 3, 4)])

    def left() -> tuple[int, int]:
        return (store._one("SELECT count(*) FROM file_lines WHERE file=?", (file_id,))[0],
                store._one("SELECT count(*) FROM files WHERE id=?", (file_id,))[0])

    assert store.file_discard(file_id, 2) is True and left() == (2, 1)
    assert store.file_discard(file_id, 2) is True and left() == (0, 1)  # exactly a chunk
    assert store.file_discard(file_id, 2) is False and left() == (0, 0)


def test_files_list_is_newest_first_or_oldest_first_as_asked(db_path):
    store = SqliteStore(db_path)
    ids = []
    for n in range(3):
        ids.append(store.file_begin("t", f"f{n}.jsonl", 10, T0 + n, purpose="batch"))
        store.file_finish(ids[-1], 1)
    newest, more = store.files_list("t", purpose=None, after=None, limit=10, newest_first=True)
    assert [f.id for f in newest] == ids[::-1] and not more
    oldest, more = store.files_list("t", purpose=None, after=None, limit=10,
                                    newest_first=False)
    assert [f.id for f in oldest] == ids and not more


def test_an_openai_batch_error_file_counts_failed_and_cancelled_items(db_path):
    store = SqliteStore(db_path)
    row = submit(store, 3, dialect="openai")
    run_items(store, 1, "failed")
    store.batch_cancel(row.id, None, T0 + 1)  # the other two end cancelled
    files = store.batch_files(row.seq)
    assert set(files) == {"batch_error"}  # nothing succeeded: no output file
    assert store.file_get(files["batch_error"], "t").lines == 3


# -- base.py ----------


def test_a_relative_database_path_is_opened_in_wal_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = SqliteStore("jobs.db")
    assert store._one("PRAGMA journal_mode")[0] == "wal"


def test_autocheckpoint_off_then_on_is_sqlites_default_again(db_path):
    store = SqliteStore(db_path)
    default = store._one("PRAGMA wal_autocheckpoint")[0]
    store.autocheckpoint(False)
    assert store._one("PRAGMA wal_autocheckpoint")[0] == 0
    store.autocheckpoint(True)
    assert store._one("PRAGMA wal_autocheckpoint")[0] == default == 1000


def test_a_checkpoint_that_finds_the_database_locked_is_skipped(db_path):
    """The store's own connection takes the file's lock for good (exclusive locking mode,
    then a write), so the checkpointer's read is refused as busy (after its 1 s wait):
    the checkpoint is skipped, not a storage fault."""
    store = SqliteStore(db_path)
    store.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    submit(store)
    assert store.checkpoint() is None


# -- batches.py ----------


def test_batches_list_pages_on_from_the_tenants_own_cursor(db_path):
    store = SqliteStore(db_path)
    b1, b2, b3 = (submit(store, tenant="a") for _ in range(3))
    page, more = store.batches_list("a", status=None, limit=2, after=None)
    assert [b.id for b in page] == [b3.id, b2.id] and more
    page, more = store.batches_list("a", status=None, limit=2, after=b2.id)
    assert [b.id for b in page] == [b1.id] and not more


def test_batches_list_refuses_another_tenants_batch_as_cursor(db_path):
    store = SqliteStore(db_path)
    submit(store, tenant="a")
    theirs = submit(store, tenant="b")
    with pytest.raises(InvalidInput):
        store.batches_list("a", status=None, limit=2, after=theirs.id)


def test_a_page_before_a_cursor_says_whether_newer_batches_follow(db_path):
    store = SqliteStore(db_path)
    b1, b2, b3, b4 = (submit(store, dialect="openai") for _ in range(4))
    page, more = store.batch_rows_list("t", dialect="openai", after=None, limit=2,
                                       before=b1.id)
    assert [r.id for r in page] == [b3.id, b2.id] and more  # b4 is newer still
    page, more = store.batch_rows_list("t", dialect="openai", after=None, limit=2,
                                       before=b2.id)
    assert [r.id for r in page] == [b4.id, b3.id] and not more


def test_the_first_page_of_a_dialects_batches_starts_at_the_newest_of_many(db_path):
    store = SqliteStore(db_path)
    rows = [submit(store, dialect="openai") for _ in range(61)]
    page, more = store.batch_rows_list("t", dialect="openai", after=None, limit=2)
    assert [r.id for r in page] == [rows[-1].id, rows[-2].id] and more


def test_no_batch_event_is_sent_that_the_webhook_did_not_subscribe_to(db_path):
    store = SqliteStore(db_path)
    row = submit(store, webhook=WebhookIn(url=HOOK, events=["batch.failed"]))
    run_items(store, 1)
    assert store.batch_get(row.id).status == "completed"
    assert deliveries_of(store, row) == []


def test_no_batch_event_is_sent_once_the_webhook_answered_410_gone(db_path):
    store = SqliteStore(db_path)
    row = submit(store, 2, webhook=WebhookIn(url=HOOK, events=["item.succeeded",
                                                               "batch.completed"]))
    run_items(store, 1)
    [d] = store.deliveries_claim(T0, 10, lease_s=30)
    store.deliveries_record([AttemptRecord(d[0], 1, True, 410, "", 5, "HTTP 410", None,
                                           T0 + 1, None, "endpoint_gone", True)])
    run_items(store, 1, now=T0 + 2)
    assert store.batch_get(row.id).status == "completed"
    assert [x.event for x in deliveries_of(store, row)] == ["item.succeeded"]


# -- deliveries.py ----------


def test_a_claimed_delivery_is_leased_until_the_lease_ends(db_path):
    store = SqliteStore(db_path)
    submit(store, webhook=WebhookIn(url=HOOK, events=["batch.completed"]))
    run_items(store, 1)
    assert len(store.deliveries_claim(T0, 10, lease_s=30)) == 1
    assert store.deliveries_claim(T0, 10, lease_s=30) == []
    assert store.deliveries_claim(T0 + 29, 10, lease_s=30) == []
    assert len(store.deliveries_claim(T0 + 30, 10, lease_s=30)) == 1


def test_a_batch_shows_its_last_attempt_and_its_failed_webhook(db_path):
    store = SqliteStore(db_path)
    row = submit(store, webhook=WebhookIn(url=HOOK, events=["batch.completed"]))
    run_items(store, 1)
    [d] = store.deliveries_claim(T0 + 1, 10, lease_s=30)
    store.deliveries_record([AttemptRecord(d[0], 1, True, 500, "no", 5, "HTTP 500", None,
                                           T0 + 2, None, "http_status", False)])
    batch = store.batch_get(row.id)
    assert batch.deliveries.failed == 1
    assert batch.deliveries.last_status_code == 500
    assert batch.deliveries.last_error == "HTTP 500"
    assert batch.deliveries.last_attempt_at == to_datetime(T0 + 2)
    [failed] = batch.failed_webhooks
    assert (failed.delivery_id, failed.event, failed.attempt_count) == (
        d[1], "batch.completed", 1)
    assert (failed.http_status, failed.error_message, failed.created_at) == (
        500, "HTTP 500", to_datetime(T0))


# -- endpoints.py ----------


def endpoint(store: SqliteStore, name: str, now: float = T0):
    return store.endpoint_create("t", name, HOOK, ["batch.completed"], f"secret_{name}",
                                 "whsec_eA", now)


def test_endpoints_list_pages_newest_first_from_a_cursor(db_path):
    store = SqliteStore(db_path)
    first, second = endpoint(store, "one"), endpoint(store, "two")
    page, more = store.endpoints_list("t", after=None, limit=1)
    assert [e.id for e in page] == [second.id] and more
    page, more = store.endpoints_list("t", after=second.id, limit=1)
    assert [e.id for e in page] == [first.id] and not more


def test_an_endpoint_update_to_a_later_sorting_name_is_written(db_path):
    store = SqliteStore(db_path)
    made = endpoint(store, "alpha")
    updated = store.endpoint_update(made.id, "t", T0 + 5, name="beta")
    assert (updated.name, updated.updated_at) == ("beta", T0 + 5)
    same = store.endpoint_update(made.id, "t", T0 + 9, name="beta")
    assert same.updated_at == T0 + 5  # nothing changed: updated_at stays


# -- items.py ----------


def test_a_batch_whose_slots_are_full_is_not_asked_again_in_the_same_claim(db_path):
    """A claim's rounds each fill it or drop a batch: a batch that took all its free
    slots (here 300, past the integers Python caches) leaves the rounds."""
    store = SqliteStore(db_path)
    capped = submit(store, 300, concurrency=300)
    other = submit(store, 1000)
    asked: list[int] = []

    def trace(cursor, sql: str, bindings) -> bool:
        if sql.startswith("SELECT seq FROM items WHERE batch=?"):
            asked.append(bindings[0])
        return True

    store.conn.exec_trace = trace
    claimed = store.items_claim("k", 700, "o", T0, lease_s=30)
    store.conn.exec_trace = None
    assert sum(c.batch_seq == capped.seq for c in claimed) == 300
    assert sum(c.batch_seq == other.seq for c in claimed) == 400
    assert asked.count(capped.seq) == 1


def test_an_items_page_says_whether_more_items_follow(db_path):
    store = SqliteStore(db_path)
    row = submit(store, 3)
    page, more = store.items_page(row.id, None, status=None, limit=2, after=-1)
    assert [i.index for i in page] == [0, 1] and more
    page, more = store.items_page(row.id, None, status=None, limit=3, after=-1)
    assert [i.index for i in page] == [0, 1, 2] and not more


# -- rows.py ----------


def test_only_a_queued_item_that_was_tried_shows_its_next_attempt(db_path):
    store = SqliteStore(db_path)
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": 0}, {"input": 1}],
                             now=T0, max_attempts=3)
    run_items(store, 1, "queued", run_at=T0 + 50)  # item 0: a retry waits
    retried, untried = store.items_page(row.id, None, status=None, limit=2, after=-1)[0]
    assert (retried.status, retried.attempts) == ("queued", 1)
    assert retried.next_attempt_at == to_datetime(T0 + 50)
    assert (untried.status, untried.attempts) == ("queued", 0)
    assert untried.next_attempt_at is None


def test_a_batch_event_body_has_its_dialects_shape(db_path):
    store = SqliteStore(db_path)
    hook = WebhookIn(url=HOOK, events=["batch.completed"])
    native = submit(store, webhook=hook)
    openai = submit(store, webhook=hook, dialect="openai")
    run_items(store, 2)
    bodies = {d.batch_id: msgspec.json.decode(d.payload_bytes)
              for row in (native, openai) for d in deliveries_of(store, row)}
    assert bodies[native.id]["type"] == "batch.completed"
    assert bodies[native.id]["data"]["id"] == native.id
    assert bodies[native.id]["data"]["status"] == "completed"  # the batch whole
    assert bodies[openai.id]["object"] == "event"
    assert bodies[openai.id]["type"] == "batch.completed"
    assert bodies[openai.id]["data"] == {"id": openai.id}
