"""The store, pinned where mutation testing (cosmic-ray, minibatch/store/ at eab3dd3) found
that no test noticed a change: secret rotation, files, cursors and pages, the claim's
rounds, delivery leases and summaries, event bodies and the connection's pragmas.

Each test drives a real store (`open_store(db_path)`: a SQLite file, or a PostgreSQL
database under MINIBATCH_TEST_STORE=postgres) under an injected clock; what only a SQLite
file has (pragmas, exec_trace, checkpoints) is marked `sqlite_only`.

Equivalent:
- interface.py 142 ReplaceBinaryOperator_Mul_Div: the `*` of `endpoint_update`'s signature
  in the `Store` Protocol; SqliteStore does not inherit the Protocol and its body is `...`,
  so nothing runs it.
- base.py 51 NumberReplacer, the variant `0` -> `-1`: SQLite treats any
  `wal_autocheckpoint` <= 0 as off (it reads back 0); the other variants are killed.
- endpoints.py 53 NumberReplacer, the variant `2**62` -> `2**61`: still above any seq SQLite
  hands out; the other variants (1**62, 3**62, 2**63) are killed.

A second pass (the seeded sample in /tmp/mut-store-sample.md, then each file's own mutants
against the fast store tests) added the tests below the marker further down. Equivalent:
- batches.py `batch_cancel`: `row.status != "cancelling"` -> `>`: the statuses that get
  there, queued and running, both sort after "cancelling" (terminal ones raise first).
- batches.py `_batch_finish_if_done`: `row.status == "cancelling"` -> `<=` (or `<`): the
  open statuses that get there, queued and running, sort after it.
- batches.py `batches_expire`: `r[0]` -> `r[-1]`: one-column rows.
- rows.py `event_type` and `event_payload`: `dialect == "openai"` -> `>=` / `>`: no dialect
  (native, openai, anthropic) sorts after "openai".
- rows.py `event_type`: `status == "failed"` -> `>=`: of the terminal statuses it is asked
  about, only "failed" sorts at or after "failed".
- rows.py `item_record_of`: `attempts > 0` -> `attempts != 0`: attempts never go below 0.
- items.py `pysecrets.randbits(62)` -> 61 or 63: the token still fits SQLite's signed
  64-bit INTEGER, and only equality with the claim's own token is ever asked.
- items.py `items_rescue`: `status == "failed"` -> `>=`: the queued items it then passes
  on would send `item.queued`, an event no webhook can subscribe to.
- deliveries.py `deliveries_record`: `status == "failed"` -> `<=`: of succeeded, failed
  and pending, only "failed" is <= "failed".
- batches.py `_items_from_iterable`: `len(chunk) >= CHUNK` -> `==`: the chunk is written
  and emptied as it reaches CHUNK, so it never grows past it (`>` and `is` are killed).
- items.py `_shares`: `len(taken[b]) < room[b]` -> `!=`: a batch never takes more than
  its room (`want` is capped by what is left of it).
- base.py `synchronous == 'full'` -> `<=`: the setting is "normal" or "full", and "normal"
  sorts after "full".
- base.py `set_busy_timeout(0)` -> `-1`: SQLite turns the busy handler off for any value
  <= 0; the checkpointer's `set_busy_timeout(1000)` -> 999: only how long a skipped
  checkpoint waits.
- base.py `if TYPE_CHECKING:` -> `if not`: the stubs it would define at runtime are
  overridden by the query classes, which come before StoreBase in the MRO.
- deliveries.py `_delivery_insert`'s `*` -> `/`: every caller passes `url` and `endpoint`
  by keyword (the public methods' `*` are pinned by the signature test).
- deliveries.py `deliveries_page`: `start = 0` -> `-1`: seqs start at 1; `limit + 1` ->
  `limit + 2` (in any listing): a longer read changes neither the page nor `more`.
- deliveries.py `delivery_by_seq`: the read's limit 1 -> 2: a seq names one delivery.
- `[0]` -> `[-1]` on a one-column row (data_version, user_version, schema_sql,
  deliveries_pending_count, a cursor's seq or rowid, ...), and `[0][0]` -> `[-1][0]` /
  `[0][-1]` on the one row of an INSERT ... RETURNING seq.
- items.py `_shares`: `break` -> `continue` once the claim is full: `continue` skips the
  rest of the round's batches just as well (each would only be skipped).
- accounts.py `_secret_rotate`: `now + 1e-6` -> `now // 1e-6`, `now / 1e-6` or
  `now + 1.000001`: the new secret's created_at is still the latest, so it still sorts
  first; nothing else reads it.
- accounts.py `file_finish`: `lines == 0` -> `lines <= 0`: lines are never negative;
  `file_discard`: `changes() == chunk` -> `>=`: the DELETE is limited to `chunk`.
- deliveries.py `_deliveries_where`: `r[6] == "pending"` -> `<=` / `>=`: an ended
  delivery's next_attempt_at is NULL (every write that ends one clears it, and the
  deliverer's records carry none unless retried), so it shows None either way.
"""

from __future__ import annotations

import msgspec
import pytest

from minibatch.delivery import AttemptRecord
from minibatch.errors import InvalidInput
from minibatch.models import WebhookIn, to_datetime
from minibatch.store import BatchRow, Outcome, SqliteStore, Store, error_bytes, open_store

T0 = 1_000_000.0
HOOK = "https://hooks.example/x"


def submit(store: Store, n: int = 1, *, tenant: str = "t", **kw) -> BatchRow:
    return store.batch_insert(tenant=tenant, kind="k", items=[{"input": i} for i in range(n)],
                              now=T0, max_attempts=1, **kw)


def run_items(store: Store, limit: int, status: str = "succeeded", *,
              now: float = T0, run_at: float = 0.0) -> list:
    """Claim up to `limit` items and end each with `status`."""
    claimed = store.items_claim("k", limit, "o", now, lease_s=30)
    error = None if status == "succeeded" else error_bytes("boom", "it broke")
    output = b"1" if status == "succeeded" else None
    store.items_finish([Outcome(c.seq, c.batch_seq, c.token, status, output, error, run_at)
                        for c in claimed], "o", now)
    return claimed


def deliveries_of(store: Store, row: BatchRow) -> list:
    return store.deliveries_page(row.seq, limit=100, after=None)[0]


# -- accounts.py ----------


def test_a_rotated_secret_keeps_signing_for_exactly_the_overlap(db_path):
    store = open_store(db_path)
    store.tenant_create("t", b"key", "secret_old", "whsec_b2xk", T0, key_id="key_1")
    assert store.secret_rotate("t", "secret_new", "whsec_bmV3", 600, T0) == ("secret_old",
                                                                          T0 + 600)
    assert [i for i, _ in store.secrets_active("t", T0 + 599)] == ["secret_new", "secret_old"]
    assert [i for i, _ in store.secrets_active("t", T0 + 600)] == ["secret_new"]


def test_finishing_a_file_stores_its_idempotency_key(db_path):
    store = open_store(db_path)
    file_id = store.file_begin("t", "in.jsonl", 10, T0)
    store.file_finish(file_id, 2, idempotency=("key-1", b"hash", 200,
                                               lambda file: file.id.encode()))
    assert store.idempotency_get("t", "key-1", 0.0) == (b"hash", 200, file_id.encode())
    other = store.file_begin("t", "in.jsonl", 10, T0)
    assert store.file_finish(other, 1).lines == 1  # no key: nothing stored, nothing fails
    assert store.idempotency_get("t", "key-2", 0.0) is None


def test_discarding_a_file_goes_chunk_by_chunk_then_deletes_the_file(db_path):
    store = open_store(db_path)
    file_id = store.file_begin("t", "in.jsonl", 10, T0)
    store.file_lines_insert(file_id, [(n, None, b"1", None, None, None) for n in (1, 2, 3, 4)])

    def left() -> tuple[int, int]:
        return (store._one("SELECT count(*) FROM file_lines WHERE file=?", (file_id,))[0],
                store._one("SELECT count(*) FROM files WHERE id=?", (file_id,))[0])

    assert store.file_discard(file_id, 2) is True and left() == (2, 1)
    assert store.file_discard(file_id, 2) is True and left() == (0, 1)  # exactly a chunk
    assert store.file_discard(file_id, 2) is False and left() == (0, 0)
    big = store.file_begin("t", "in.jsonl", 10, T0)  # a chunk past the cached integers
    store.file_lines_insert(big, [(n, None, b"1", None, None, None) for n in range(1, 302)])
    assert store.file_discard(big, 300) is True
    assert store.file_discard(big, 300) is False
    assert store._one("SELECT count(*) FROM files WHERE id=?", (big,))[0] == 0


def test_files_list_is_newest_first_or_oldest_first_as_asked(db_path):
    store = open_store(db_path)
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
    store = open_store(db_path)
    row = submit(store, 3, dialect="openai")
    run_items(store, 1, "failed")
    store.batch_cancel(row.id, None, T0 + 1)  # the other two end cancelled
    files = store.batch_files(row.seq)
    assert set(files) == {"batch_error"}  # nothing succeeded: no output file
    assert store.file_get(files["batch_error"], "t").lines == 3


# -- base.py ----------


@pytest.mark.sqlite_only
def test_a_relative_database_path_is_opened_in_wal_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store("jobs.db")
    assert store._one("PRAGMA journal_mode")[0] == "wal"


@pytest.mark.sqlite_only
def test_autocheckpoint_off_then_on_is_sqlites_default_again(db_path):
    store = open_store(db_path)
    default = store._one("PRAGMA wal_autocheckpoint")[0]
    store.autocheckpoint(False)
    assert store._one("PRAGMA wal_autocheckpoint")[0] == 0
    store.autocheckpoint(True)
    assert store._one("PRAGMA wal_autocheckpoint")[0] == default == 1000


@pytest.mark.sqlite_only
def test_a_checkpoint_that_finds_the_database_locked_is_skipped(db_path):
    """The store's own connection takes the file's lock for good (exclusive locking mode,
    then a write), so the checkpointer's read is refused as busy (after its 1 s wait):
    the checkpoint is skipped, not a storage fault."""
    store = open_store(db_path)
    store.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    submit(store)
    assert store.checkpoint() is None


# -- batches.py ----------


def test_batches_list_pages_on_from_the_tenants_own_cursor(db_path):
    store = open_store(db_path)
    b1, b2, b3 = (submit(store, tenant="a") for _ in range(3))
    page, more = store.batches_list("a", status=None, limit=2, after=None)
    assert [b.id for b in page] == [b3.id, b2.id] and more
    page, more = store.batches_list("a", status=None, limit=2, after=b2.id)
    assert [b.id for b in page] == [b1.id] and not more


def test_batches_list_refuses_another_tenants_batch_as_cursor(db_path):
    store = open_store(db_path)
    submit(store, tenant="a")
    theirs = submit(store, tenant="b")
    with pytest.raises(InvalidInput):
        store.batches_list("a", status=None, limit=2, after=theirs.id)


def test_a_page_before_a_cursor_says_whether_newer_batches_follow(db_path):
    store = open_store(db_path)
    b1, b2, b3, b4 = (submit(store, dialect="openai") for _ in range(4))
    page, more = store.batch_rows_list("t", dialect="openai", after=None, limit=2,
                                       before=b1.id)
    assert [r.id for r in page] == [b3.id, b2.id] and more  # b4 is newer still
    page, more = store.batch_rows_list("t", dialect="openai", after=None, limit=2,
                                       before=b2.id)
    assert [r.id for r in page] == [b4.id, b3.id] and not more


def test_the_first_page_of_a_dialects_batches_starts_at_the_newest_of_many(db_path):
    store = open_store(db_path)
    rows = [submit(store, dialect="openai") for _ in range(125)]  # past 2*62 and 2+62
    page, more = store.batch_rows_list("t", dialect="openai", after=None, limit=2)
    assert [r.id for r in page] == [rows[-1].id, rows[-2].id] and more


def test_no_batch_event_is_sent_that_the_webhook_did_not_subscribe_to(db_path):
    store = open_store(db_path)
    row = submit(store, webhook=WebhookIn(url=HOOK, events=["batch.failed"]))
    run_items(store, 1)
    assert store.batch_get(row.id).status == "completed"
    assert deliveries_of(store, row) == []


def test_no_batch_event_is_sent_once_the_webhook_answered_410_gone(db_path):
    store = open_store(db_path)
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
    store = open_store(db_path)
    submit(store, webhook=WebhookIn(url=HOOK, events=["batch.completed"]))
    run_items(store, 1)
    assert len(store.deliveries_claim(T0, 10, lease_s=30)) == 1
    assert store.deliveries_claim(T0, 10, lease_s=30) == []
    assert store.deliveries_claim(T0 + 29, 10, lease_s=30) == []
    assert len(store.deliveries_claim(T0 + 30, 10, lease_s=30)) == 1


def test_a_batch_shows_its_last_attempt_and_its_failed_webhook(db_path):
    store = open_store(db_path)
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


def endpoint(store: Store, name: str, now: float = T0):
    return store.endpoint_create("t", name, HOOK, ["batch.completed"], f"secret_{name}",
                                 "whsec_eA", now)


def test_endpoints_list_pages_newest_first_from_a_cursor(db_path):
    store = open_store(db_path)
    first, second = endpoint(store, "one"), endpoint(store, "two")
    page, more = store.endpoints_list("t", after=None, limit=1)
    assert [e.id for e in page] == [second.id] and more
    page, more = store.endpoints_list("t", after=second.id, limit=1)
    assert [e.id for e in page] == [first.id] and not more


def test_an_endpoint_update_to_a_later_sorting_name_is_written(db_path):
    store = open_store(db_path)
    made = endpoint(store, "alpha")
    updated = store.endpoint_update(made.id, "t", T0 + 5, name="beta")
    assert (updated.name, updated.updated_at) == ("beta", T0 + 5)
    same = store.endpoint_update(made.id, "t", T0 + 9, name="beta")
    assert same.updated_at == T0 + 5  # nothing changed: updated_at stays


# -- items.py ----------


@pytest.mark.sqlite_only
def test_a_batch_whose_slots_are_full_is_not_asked_again_in_the_same_claim(db_path):
    """A claim's rounds each fill it or drop a batch: a batch that took all its free
    slots (here 300, past the integers Python caches) leaves the rounds."""
    store = open_store(db_path)
    capped = submit(store, 300, concurrency=300)
    other = submit(store, 1000)
    asked: list[int] = []

    def trace(cursor, sql: str, bindings) -> bool:
        if sql.startswith("SELECT seq, batch, idx, entry_id, input, metadata, attempts"):
            asked.append(bindings[0])
        return True

    store.conn.exec_trace = trace
    claimed = store.items_claim("k", 700, "o", T0, lease_s=30)
    store.conn.exec_trace = None
    assert sum(c.batch_seq == capped.seq for c in claimed) == 300
    assert sum(c.batch_seq == other.seq for c in claimed) == 400
    assert asked.count(capped.seq) == 1


def test_an_items_page_says_whether_more_items_follow(db_path):
    store = open_store(db_path)
    row = submit(store, 3)
    page, more = store.items_page(row.id, None, status=None, limit=2, after=-1)
    assert [i.index for i in page] == [0, 1] and more
    page, more = store.items_page(row.id, None, status=None, limit=3, after=-1)
    assert [i.index for i in page] == [0, 1, 2] and not more


# -- rows.py ----------


def test_only_a_queued_item_that_was_tried_shows_its_next_attempt(db_path):
    store = open_store(db_path)
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": 0}, {"input": 1}],
                             now=T0, max_attempts=3)
    run_items(store, 1, "queued", run_at=T0 + 50)  # item 0: a retry waits
    retried, untried = store.items_page(row.id, None, status=None, limit=2, after=-1)[0]
    assert (retried.status, retried.attempts) == ("queued", 1)
    assert retried.next_attempt_at == to_datetime(T0 + 50)
    assert (untried.status, untried.attempts) == ("queued", 0)
    assert untried.next_attempt_at is None


def test_a_batch_event_body_has_its_dialects_shape(db_path):
    store = open_store(db_path)
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


# -- the second pass ----------


def test_every_store_method_has_the_protocols_parameters_and_keyword_only_ones(db_path):
    """SqliteStore's methods take the parameters `Store` names, of the same kind (the
    keyword-only ones after `*` included) and with the same defaults."""
    import inspect

    from minibatch.store import Store

    names = [n for n, v in vars(Store).items() if callable(v) and not n.startswith("_")]
    assert len(names) > 60
    for name in names:
        ours = inspect.signature(getattr(SqliteStore, name)).parameters
        theirs = inspect.signature(getattr(Store, name)).parameters
        assert [(p.name, p.kind, p.default) for p in ours.values()] == [
            (p.name, p.kind, p.default) for p in theirs.values()], name
    with pytest.raises(TypeError):
        open_store(":memory:", "full")  # type: ignore[misc]
    store = open_store(db_path)
    with pytest.raises(TypeError):
        store.batch_insert_refused("t", "k", T0, None, "openai", {})  # type: ignore[misc]
    with pytest.raises(TypeError):
        store.batches_list("t", None, 10, None)  # type: ignore[misc]


def test_tenants_exist_once_made(db_path):
    store = open_store(db_path)
    assert store.tenant_exists("t") is False
    store.tenant_create("t", b"key", "secret_1", "whsec_eA", T0, key_id="key_1")
    assert store.tenant_exists("t") is True
    assert store.tenant_exists("u") is False


def test_keys_list_shows_when_a_key_was_used_and_revoked(db_path):
    store = open_store(db_path)
    store.tenant_create("t", b"k1", "secret_1", "whsec_eA", T0, key_id="key_1", key_name="ci")
    store.tenant_create("u", b"k2", "secret_2", "whsec_eA", T0 + 1, key_id="key_2")
    assert store.tenant_by_key(b"k1", T0 + 100) == ("t", T0 + 100)
    store.key_revoke("key_2", T0 + 200)
    assert store.keys_list(None) == [
        {"id": "key_1", "tenant": "t", "name": "ci", "created_at": to_datetime(T0),
         "last_used_at": to_datetime(T0 + 100), "revoked_at": None},
        {"id": "key_2", "tenant": "u", "name": None, "created_at": to_datetime(T0 + 1),
         "last_used_at": None, "revoked_at": to_datetime(T0 + 200)}]
    assert [k["id"] for k in store.keys_list("u")] == ["key_2"]


def test_a_dialects_file_id_has_a_dash_and_a_native_one_an_underscore(db_path):
    store = open_store(db_path)
    assert store.file_begin("t", "a.jsonl", 1, T0, purpose="batch").startswith("file-")
    assert store.file_begin("t", "a.jsonl", 1, T0).startswith("file_")


def test_a_native_file_with_no_lines_is_refused_but_a_dialects_is_not(db_path):
    store = open_store(db_path)
    native = store.file_begin("t", "a.jsonl", 0, T0)
    with pytest.raises(InvalidInput) as refused:
        store.file_finish(native, 0)
    assert refused.value.errors == [{"line": 1, "message": "empty"}]
    dialect = store.file_begin("t", "a.jsonl", 0, T0, purpose="batch")
    assert store.file_finish(dialect, 0, build=lambda row: row.lines) == 0
    assert store.file_get(dialect, "t").lines == 0


def pages_of(page) -> list:
    """Walk a paged listing: `page(after)` -> (rows, more), the cursor a row's `id`."""
    seen, after = [], None
    while True:
        rows, more = page(after)
        seen.append(len(rows))
        if not more:
            return seen
        after = rows[-1].id


def test_every_listing_says_more_only_when_a_row_follows(db_path):
    """Pages of 1 and 3 (odd: `limit + 1` is not `limit | 1` nor `limit ^ 1`) over 4 rows,
    and a page larger than what is left."""
    store = open_store(db_path)
    for _ in range(4):
        submit(store, dialect="openai")
    run_items(store, 4)
    files = []
    for n in range(4):
        files.append(store.file_begin("t", f"{n}.jsonl", 1, T0, purpose="batch"))
        store.file_finish(files[-1], 1)
    for n in range(4):
        endpoint(store, f"e{n}")
    big = submit(store, 4)
    listings = {
        "batches": lambda limit: lambda after: store.batches_list(
            "t", status="completed", limit=limit, after=after),
        "rows": lambda limit: lambda after: store.batch_rows_list(
            "t", dialect="openai", after=after, limit=limit),
        "files": lambda limit: lambda after: store.files_list(
            "t", purpose="batch", after=after, limit=limit, newest_first=True),
        "endpoints": lambda limit: lambda after: store.endpoints_list(
            "t", after=after, limit=limit),
    }
    for name, listing in listings.items():
        assert listing(0)(None) == ([], True), name
        assert pages_of(listing(1)) == [1, 1, 1, 1], name
        assert pages_of(listing(3)) == [3, 1], name
        assert pages_of(listing(5)) == [4], name
    page, more = store.items_page(big.id, None, status=None, limit=3, after=-1)
    assert [i.index for i in page] == [0, 1, 2] and more
    page, more = store.items_page(big.id, None, status=None, limit=3, after=2)
    assert [i.index for i in page] == [3] and not more
    page, more = store.items_page(big.id, None, status=None, limit=1, after=0)
    assert [i.index for i in page] == [1] and more


def test_a_batchs_deliveries_page_on_from_a_cursor(db_path):
    store = open_store(db_path)
    row = submit(store, 4, webhook=WebhookIn(url=HOOK, events=["item.succeeded"]))
    run_items(store, 4)
    made = deliveries_of(store, row)
    assert len(made) == 4
    seen, after = [], None
    for _ in range(4):
        page, more = store.deliveries_page(row.seq, limit=1, after=after)
        seen += [d.id for d in page]
        after = page[-1].id
        assert more is (len(seen) < 4)
    assert seen == [d.id for d in made]
    page, more = store.deliveries_page(row.seq, limit=3, after=made[0].id)
    assert [d.id for d in page] == [d.id for d in made[1:]] and not more
    page, more = store.deliveries_page(row.seq, limit=2, after=made[0].id)
    assert [d.id for d in page] == [d.id for d in made[1:3]] and more
    assert store.deliveries_page(row.seq, limit=10, after=None)[1] is False
    assert store.deliveries_page(row.seq, limit=0, after=None) == ([], True)
    with pytest.raises(InvalidInput):
        store.deliveries_page(row.seq, limit=2, after="msg_nope")


def test_an_items_page_refuses_a_cursor_outside_the_batch(db_path):
    store = open_store(db_path)
    row = submit(store, 3)
    for bad in (-2, 3, 4, 100):
        with pytest.raises(InvalidInput):
            store.items_page(row.id, None, status=None, limit=2, after=bad)
    assert store.items_page(row.id, None, status=None, limit=2, after=2) == ([], False)


def test_a_batch_keeps_its_dialect_data_and_has_none_without(db_path):
    store = open_store(db_path)
    with_data = submit(store, dialect="openai", dialect_data={"endpoint": "/v1/x"})
    assert with_data.data() == {"endpoint": "/v1/x"}
    assert store.batch_row(with_data.id, "t").data() == {"endpoint": "/v1/x"}
    without = submit(store)
    assert without.dialect_data is None and without.data() == {}


def test_an_item_that_cannot_be_encoded_refuses_the_whole_batch(db_path):
    store = open_store(db_path)
    loop: list = []
    loop.append(loop)
    for bad in (object(), 10**5000, loop, {(1, 2): 3}):  # TypeError, ValueError, recursion
        with pytest.raises(InvalidInput, match="item 1 is not JSON-encodable"):
            store.batch_insert(tenant="t", kind="k", items=[{"input": 1}, {"input": bad}],
                               now=T0, max_attempts=1)
    with pytest.raises(InvalidInput, match="item 0 is not JSON-encodable"):
        store.batch_insert(tenant="t", kind="k", items=[{"input": 1, "metadata": {"m": loop}}],
                           now=T0, max_attempts=1)
    assert store._one("SELECT count(*) FROM batches")[0] == 0


@pytest.mark.sqlite_only
def test_items_are_read_and_written_five_thousand_at_a_time(db_path):
    """The items of a submit are pulled from the iterable a chunk at a time: the first
    INSERT comes once 5,000 have been read, not all 10,001."""
    store = open_store(db_path)
    read = [0]

    def items():
        for n in range(10_001):
            read[0] += 1
            yield {"input": n}

    at_insert: list[int] = []

    def trace(cursor, sql: str, bindings) -> bool:
        if sql.startswith("INSERT INTO items"):
            at_insert.append(read[0])
        return True

    store.conn.exec_trace = trace
    store.batch_insert(tenant="t", kind="k", items=items(), now=T0, max_attempts=1)
    store.conn.exec_trace = None
    assert sorted(set(at_insert)) == [5000, 10_000, 10_001]
    assert at_insert.count(5000) == 5000 and at_insert.count(10_001) == 1


def test_a_submit_over_the_tenants_queue_asks_to_come_back_in_ten_seconds(db_path):
    from minibatch.errors import TooManyRequests

    store = open_store(db_path)
    submit(store, 3, max_queued=5)
    with pytest.raises(TooManyRequests) as refused:
        submit(store, 3, max_queued=5)
    assert refused.value.headers == {"Retry-After": "10"}
    assert store._one("SELECT count(*) FROM batches")[0] == 1


def test_another_tenants_batch_or_delivery_is_not_found_whichever_name_sorts_first(db_path):
    from minibatch.errors import NotFound

    store = open_store(db_path)
    hook = WebhookIn(url=HOOK, events=["batch.completed"])
    mine = {t: submit(store, tenant=t, webhook=hook) for t in ("a", "b")}
    run_items(store, 2)
    for owner, asker in (("a", "b"), ("b", "a")):
        with pytest.raises(NotFound):
            store.batch_get(mine[owner].id, asker)
        with pytest.raises(InvalidInput):
            store.batches_list(asker, status=None, limit=5, after=mine[owner].id)
        [d] = deliveries_of(store, mine[owner])
        with pytest.raises(NotFound):
            store.delivery_redeliver(d.id, asker, T0 + 1)
        assert store.batch_get(mine[owner].id, owner).id == mine[owner].id


def test_only_a_dialect_that_has_them_gets_output_files(db_path):
    store = open_store(db_path)
    rows = {d: submit(store, dialect=d) for d in ("native", "anthropic", "openai")}
    run_items(store, 3)
    assert store.batch_files(rows["native"].seq) == {}
    assert store.batch_files(rows["anthropic"].seq) == {}
    assert set(store.batch_files(rows["openai"].seq)) == {"batch_output"}


def test_batches_cancelling_names_the_cancelled_or_cancelling_of_those_asked(db_path):
    store = open_store(db_path)
    running, cancelling, also_running, other = (submit(store, 2) for _ in range(4))
    store.items_claim("k", 8, "o", T0, lease_s=30)
    store.batch_cancel(cancelling.id, None, T0)  # its running items keep it cancelling
    finished = submit(store, 1)
    store.batch_cancel(finished.id, None, T0)  # nothing running: cancelled at once
    assert store.batch_get(finished.id).status == "cancelled"
    asked = [running.seq, cancelling.seq, finished.seq, also_running.seq]
    assert sorted(store.batches_cancelling(asked)) == sorted([cancelling.seq, finished.seq])
    assert store.batches_cancelling([]) == []
    assert store.batches_cancelling(iter([cancelling.seq])) == [cancelling.seq]
    assert other.seq not in store.batches_cancelling([other.seq])


def test_a_batch_lists_its_twenty_newest_failed_webhooks_oldest_first(db_path):
    store = open_store(db_path)
    row = submit(store, 22, webhook=WebhookIn(url=HOOK, events=["item.succeeded"]))
    run_items(store, 22)
    claimed = store.deliveries_claim(T0, 30, lease_s=30)
    store.deliveries_record([AttemptRecord(d[0], 1, True, 500, "no", 5, "HTTP 500", None,
                                           T0 + 1, None, "http_status", False)
                             for d in claimed])
    made = [d.id for d in deliveries_of(store, row)]
    batch = store.batch_get(row.id)
    assert batch.deliveries.failed == batch.deliveries.total == 22
    assert [f.delivery_id for f in batch.failed_webhooks] == made[2:]


def test_a_new_delivery_is_due_after_the_schedules_first_delay(db_path):
    store = open_store(db_path, webhook_schedule=(5.0, 60.0))
    row = submit(store, webhook=WebhookIn(url=HOOK, events=["batch.completed"]))
    run_items(store, 1, now=T0 + 10)
    [d] = deliveries_of(store, row)
    assert d.next_attempt_at == to_datetime(T0 + 15) and d.max_attempts == 2
    assert store.deliveries_claim(T0 + 14, 10, lease_s=30) == []
    assert len(store.deliveries_claim(T0 + 15, 10, lease_s=30)) == 1
    plain = open_store(":memory:")  # the default schedule: due at once
    other = submit(plain, webhook=WebhookIn(url=HOOK, events=["batch.completed"]))
    run_items(plain, 1, now=T0 + 10)
    assert deliveries_of(plain, other)[0].next_attempt_at == to_datetime(T0 + 10)


def test_a_deliverys_page_shows_its_id_attempts_and_why_it_failed_only_once_failed(db_path):
    store = open_store(db_path, webhook_schedule=(0.0, 60.0))
    row = submit(store, webhook=WebhookIn(url=HOOK, events=["batch.completed"]))
    run_items(store, 1)
    [d] = store.deliveries_claim(T0, 10, lease_s=30)

    def attempt(n: int, at: float, next_at: float | None) -> None:
        store.deliveries_record([AttemptRecord(d[0], n, True, 503, f"body {n}", 7,
                                               f"HTTP 503 #{n}", "secret_1", at, next_at,
                                               "http_status", False)])

    attempt(1, T0 + 1, T0 + 61)
    [shown] = deliveries_of(store, row)
    assert shown.id == d[1] and shown.batch_id == row.id and shown.url == HOOK
    assert (shown.status, shown.failure_reason_code, shown.failure_detail) == (
        "pending", None, None)
    assert shown.completed_at is None and shown.next_attempt_at == to_datetime(T0 + 61)
    [a] = shown.attempts
    assert (a.attempt_number, a.status_code, a.response_body, a.response_time_ms,
            a.error_message, a.created_at) == (1, 503, "body 1", 7, "HTTP 503 #1",
                                               to_datetime(T0 + 1))
    store.deliveries_claim(T0 + 61, 10, lease_s=30)
    attempt(2, T0 + 62, None)
    [shown] = deliveries_of(store, row)
    assert (shown.status, shown.failure_reason_code, shown.failure_detail) == (
        "failed", "http_status", "HTTP 503 #2")
    assert shown.completed_at == to_datetime(T0 + 62) and shown.next_attempt_at is None
    assert [(a.attempt_number, a.response_body) for a in shown.attempts] == [
        (1, "body 1"), (2, "body 2")]
    assert (shown.signing_secret_id, shown.attempt_count, shown.is_automatic) == (
        "secret_1", 2, True)
    assert shown.created_at == to_datetime(T0) and shown.endpoint_id is None


def test_the_first_page_of_endpoints_starts_at_the_newest_of_many(db_path):
    store = open_store(db_path)
    made = [endpoint(store, f"e{n}") for n in range(125)]  # past 2*62 and 2+62
    page, more = store.endpoints_list("t", after=None, limit=1)
    assert [e.id for e in page] == [made[-1].id] and more


def test_an_endpoint_update_of_its_event_types_alone_is_written(db_path):
    store = open_store(db_path)
    made = endpoint(store, "one")
    updated = store.endpoint_update(made.id, "t", T0 + 5, event_types=["batch.failed"])
    assert updated.events() == ["batch.failed"] and updated.updated_at == T0 + 5
    assert (updated.name, updated.url) == ("one", HOOK)
    same = store.endpoint_update(made.id, "t", T0 + 9, url=HOOK)
    assert same.updated_at == T0 + 5 and same.events() == ["batch.failed"]


def test_a_lost_item_past_its_attempts_fails_on_rescue_and_only_a_failed_one_is_an_event(
        db_path):
    """An item whose attempts already exceed the batch's (a row written by other means,
    or a batch whose max_attempts was lowered) fails rather than going round again."""
    store = open_store(db_path)
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": 0}, {"input": 1}],
                             now=T0, max_attempts=2, webhook=WebhookIn(
                                 url=HOOK, events=["item.failed", "item.succeeded"]))
    store.items_claim("k", 2, "o", T0, lease_s=30)
    store.conn.execute("UPDATE items SET attempts=3 WHERE idx=0")
    assert store.items_rescue(T0 + 31) == 2
    first, second = store.items_page(row.id, None, status=None, limit=2, after=-1)[0]
    assert (first.status, second.status) == ("failed", "queued")
    assert [d.event for d in deliveries_of(store, row)] == ["item.failed"]


def test_a_batch_url_shows_no_userinfo_nor_query_values_and_brackets_ipv6():
    from minibatch.store import sanitize_url

    assert sanitize_url("https://user:pw@hooks.example:8443/x?a=1&b=2#f") == (
        "https://hooks.example:8443/x?a=&b=")
    assert sanitize_url("http://[::1]:9000/p") == "http://[::1]:9000/p"
    assert sanitize_url("http://10.0.0.1/p") == "http://10.0.0.1/p"


def test_a_batchs_duration_is_in_milliseconds(db_path):
    store = open_store(db_path)
    row = submit(store)
    store.items_claim("k", 1, "o", T0 + 1, lease_s=30)
    store.items_rescue(T0 + 1500.25)  # the lease lapsed: the item fails
    batch = store.batch_get(row.id)
    assert batch.status == "failed" and batch.duration_ms == 1_499_250


def test_an_item_error_is_capped_at_100_characters_of_code_and_2000_of_message():
    from minibatch.store import readable_error

    error = readable_error(error_bytes("c" * 150, "m" * 2500))
    assert (len(error.code), len(error.message)) == (100, 2000)
    assert readable_error(error_bytes("c" * 100, "m" * 2000)) == readable_error(
        error_bytes("c" * 100, "m" * 2000 + "more"))


def test_an_openai_batch_ends_in_openais_event_words(db_path):
    store = open_store(db_path)
    failed = submit(store, dialect="openai")
    run_items(store, 1, "failed")
    assert store.batch_row(failed.id, "t").event_type() == "batch.completed"
    cancelled = submit(store, dialect="openai")
    store.batch_cancel(cancelled.id, None, T0)
    assert store.batch_row(cancelled.id, "t").event_type() == "batch.cancelled"
    refused = store.batch_insert_refused(tenant="t", kind="k", now=T0, metadata=None,
                                         dialect="openai", dialect_data={})
    assert (refused.status, refused.event_type()) == ("failed", "batch.failed")
    native = submit(store)
    run_items(store, 1, "failed")
    assert store.batch_row(native.id, "t").event_type() == "batch.failed"


def test_a_batch_url_keeps_the_names_of_blank_query_values():
    from minibatch.store import sanitize_url

    assert sanitize_url("https://h.example/x?a=&b=2&c") == "https://h.example/x?a=&b=&c="


def test_an_item_that_is_not_an_item_object_refuses_the_batch(db_path):
    store = open_store(db_path)
    for bad in ({"input": 1, "entry_id": 5}, {"metadata": {}}, [1], "x"):
        with pytest.raises(InvalidInput, match="item 1"):
            store.batch_insert(tenant="t", kind="k", items=[{"input": 0}, bad], now=T0,
                               max_attempts=1)
    assert store._one("SELECT count(*) FROM batches")[0] == 0


def test_an_item_shows_its_output_metadata_and_next_attempt_only_where_it_has_them(
        db_path):
    store = open_store(db_path)
    row = store.batch_insert(tenant="t", kind="k", now=T0, max_attempts=3, items=[
        {"input": 0, "metadata": {"m": 1}}, {"input": 1}, {"input": 2}, {"input": 3}])
    [done] = run_items(store, 1)
    [retried] = run_items(store, 1, "queued", run_at=T0 + 50)
    store.items_claim("k", 1, "o", T0, lease_s=30)  # item 2 runs
    items = {i.index: i for i in store.items_page(row.id, None, status=None, limit=4,
                                                  after=-1)[0]}
    assert (items[0].status, items[0].output, items[0].metadata) == ("succeeded", 1,
                                                                      {"m": 1})
    assert items[0].next_attempt_at is None and done.item.index == 0
    assert (items[1].status, items[1].output, items[1].metadata) == ("queued", None, None)
    assert items[1].next_attempt_at == to_datetime(T0 + 50) and retried.item.index == 1
    assert items[1].error.code == "boom"
    assert (items[2].status, items[2].attempts, items[2].next_attempt_at) == (
        "running", 1, None)
    assert (items[3].status, items[3].error, items[3].next_attempt_at) == ("queued", None,
                                                                          None)
    failed = store.batch_insert(tenant="t", kind="f", now=T0, max_attempts=1,
                                items=[{"input": 0}])
    [c] = store.items_claim("f", 1, "o", T0, lease_s=30)
    store.items_finish([Outcome(c.seq, c.batch_seq, c.token, "failed", None,
                                error_bytes("x", "y"), T0 + 50)], "o", T0)
    [gone] = store.items_page(failed.id, None, status=None, limit=1, after=-1)[0]
    assert (gone.status, gone.attempts, gone.next_attempt_at) == ("failed", 1, None)


def test_a_stored_value_that_cannot_be_decoded_is_shown_as_its_text(db_path):
    store = open_store(db_path)
    row = submit(store, 2)
    store.conn.execute("UPDATE items SET input=?, output=?, error=?, metadata=?"
                       " WHERE idx=0", (b"1e400", b"[", b"{oops", b"\xff"))
    first = store.items_page(row.id, None, status=None, limit=1, after=-1)[0][0]
    assert (first.input, first.output, first.metadata) == ("1e400", "[", "\ufffd")
    assert (first.error.code, first.error.message) == ("unreadable_error", "{oops")


def test_a_batch_shows_its_duration_metadata_webhook_and_cancel_url(db_path):
    store = open_store(db_path)
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": 0}], now=500.0,
                             max_attempts=1, metadata={"a": 1},
                             webhook=WebhookIn(url="https://u:p@h.example/x?k=v",
                                               events=["batch.failed"]))
    open_ = store.batch_get(row.id)
    assert open_.cancel_url == f"/v1/batches/{row.id}/cancel" and open_.duration_ms is None
    assert open_.metadata == {"a": 1}
    assert (open_.webhook.url, open_.webhook.events) == ("https://h.example/x?k=",
                                                         ["batch.failed"])
    store.items_claim("k", 1, "o", 1000.0, lease_s=30)
    store.items_rescue(2500.5)  # the lease lapsed: the item fails, and the batch
    ended = store.batch_get(row.id)
    assert ended.status == "failed" and ended.duration_ms == 1_500_500
    assert ended.cancel_url is None
    plain = store.batch_get(submit(store).id)
    assert plain.webhook is None and plain.metadata == {}


def test_an_ended_delivery_is_redelivered_once_more_whether_it_failed_or_succeeded(db_path):
    store = open_store(db_path)
    row = submit(store, 2, webhook=WebhookIn(url=HOOK, events=["item.succeeded"]))
    run_items(store, 2)
    ok, bad = store.deliveries_claim(T0, 10, lease_s=30)
    store.deliveries_record([
        AttemptRecord(ok[0], 1, True, 200, "", 5, None, None, T0 + 1, None, None, False),
        AttemptRecord(bad[0], 1, True, 500, "", 5, "HTTP 500", None, T0 + 1, None,
                      "http_status", False)])
    assert {d.status for d in deliveries_of(store, row)} == {"succeeded", "failed"}
    for msg_id in (ok[1], bad[1]):
        again = store.delivery_redeliver(msg_id, "t", T0 + 5)
        assert (again.status, again.is_automatic, again.max_attempts) == ("pending", False, 2)
        assert (again.failure_reason_code, again.completed_at) == (None, None)
        assert again.next_attempt_at == to_datetime(T0 + 5)
    assert len(store.deliveries_claim(T0 + 5, 10, lease_s=30)) == 2


def test_a_tenants_second_key_keeps_its_first_secret_and_a_revoked_key_is_refused(db_path):
    from minibatch.errors import NotFound

    store = open_store(db_path)
    store.tenant_create("t", b"k1", "secret_1", "whsec_eA", T0, key_id="key_1")
    store.tenant_create("t", b"k2", "secret_2", "whsec_eB", T0 + 1, key_id="key_2")
    assert store.secrets_active("t", T0 + 2) == [("secret_1", "whsec_eA")]
    assert store.tenant_by_key(b"k2", T0 + 2) == ("t", T0 + 2)
    assert store.tenant_by_key(b"nope", T0 + 2) is None
    other = store.another()
    other.key_revoke("key_2", T0 + 3)
    assert store.tenant_by_key(b"k2", T0 + 4) is None
    store.key_revoke("key_2", T0 + 9)  # again: the first revocation's time stays
    assert [k["revoked_at"] for k in store.keys_list("t")] == [None, to_datetime(T0 + 3)]
    with pytest.raises(NotFound):
        store.key_revoke("key_nope", T0)
    other.close()


def test_rotating_twice_ends_the_oldest_secret_at_once(db_path):
    store = open_store(db_path)
    assert store.secret_rotate("t", "secret_1", "whsec_eA", 600, T0) == (None, None)
    assert store.secret_rotate("t", "secret_2", "whsec_eB", 600, T0 + 10) == (
        "secret_1", T0 + 610)
    assert store.secret_rotate("t", "secret_3", "whsec_eC", 600, T0 + 20) == (
        "secret_2", T0 + 620)
    assert [i for i, _ in store.secrets_active("t", T0 + 20)] == ["secret_3", "secret_2"]
    assert [i for i, _ in store.secrets_active("t", T0 + 620)] == ["secret_3"]
    made = endpoint(store, "e")  # an endpoint's secrets are its own
    assert [i for i, _ in store.secrets_active("t", T0 + 20, made.id)] == ["secret_e"]
    store.endpoint_rotate(made.id, "t", "secret_e2", "whsec_eD", 60, T0 + 30)
    assert [i for i, _ in store.secrets_active("t", T0 + 30, made.id)] == ["secret_e2",
                                                                          "secret_e"]
    assert [i for i, _ in store.secrets_active("t", T0 + 30)] == ["secret_3", "secret_2"]


def test_files_list_pages_from_a_cursor_either_way_and_by_purpose(db_path):
    store = open_store(db_path)
    ids = []
    for n, purpose in enumerate(("batch", "batch", "other", "batch")):
        ids.append(store.file_begin("t", f"{n}.jsonl", 10, T0, purpose=purpose))
        store.file_finish(ids[-1], 1)
    store.file_begin("t", "unfinished.jsonl", 10, T0, purpose="batch")
    native = store.file_begin("t", "native.jsonl", 10, T0)
    store.file_finish(native, 1)
    theirs = store.file_begin("u", "x.jsonl", 10, T0, purpose="batch")
    store.file_finish(theirs, 1)
    page, more = store.files_list("t", purpose="batch", after=ids[3], limit=1,
                                  newest_first=True)
    assert [f.id for f in page] == [ids[1]] and more
    page, more = store.files_list("t", purpose=None, after=ids[0], limit=5,
                                  newest_first=False)
    assert [f.id for f in page] == ids[1:] and not more
    for cursor in ("file-nope", theirs):
        with pytest.raises(InvalidInput):
            store.files_list("t", purpose=None, after=cursor, limit=5, newest_first=True)


def test_a_file_keeps_its_size_parts_problems_and_is_found_only_once_finished(db_path):
    from minibatch.errors import NotFound

    store = open_store(db_path)
    file_id = store.file_begin("t", "in.jsonl", 10, T0 + 3, purpose="batch")
    with pytest.raises(NotFound):
        store.file_get(file_id, "t")
    for part in (0, 1, 2):
        store.file_part_insert(file_id, part, bytes([part]))
    assert store.file_parts_page(file_id, 0, 1) == [(1, b"\x01")]
    assert store.file_parts_page(file_id, -1, 5) == [(0, b"\x00"), (1, b"\x01"),
                                                     (2, b"\x02")]
    store.file_lines_insert(file_id, [(1, None, b"1", None, "/v1/a", None),
                                      (2, None, b"1", None, "/v1/b", None),
                                      (3, None, b"1", None, "/v1/a", b'{"bad":1}'),
                                      (4, None, b"1", None, "/v1/b", None)])
    assert store.file_problems(file_id, "/v1/a", 10) == [(2, None), (3, b'{"bad":1}'),
                                                         (4, None)]
    assert store.file_problems(file_id, "/v1/a", 2) == [(2, None), (3, b'{"bad":1}')]
    made = store.file_finish(file_id, 4)
    assert (made.id, made.bytes, made.lines, made.filename, made.created_at) == (
        file_id, 10, 4, "in.jsonl", to_datetime(T0 + 3))
    store.file_set_bytes(file_id, 99)
    row = store.file_get(file_id, "t")
    assert (row.bytes, row.lines, row.purpose, row.batch) == (99, 4, "batch", None)
    with pytest.raises(NotFound):
        store.file_get(file_id, "u")


def test_an_idempotency_key_is_found_since_a_time_and_pruned_before_one(db_path):
    store = open_store(db_path)
    submit(store, idempotency=("key-1", b"h", 201, lambda row: row.id.encode()))
    [(body_hash, status, response)] = [store.idempotency_get("t", "key-1", T0)]
    assert (body_hash, status) == (b"h", 201) and response.startswith(b"batch_")
    assert store.idempotency_get("t", "key-1", T0 + 1) is None
    assert store.idempotency_get("u", "key-1", 0.0) is None
    store.idempotency_prune(T0)
    assert store.idempotency_get("t", "key-1", 0.0) is not None
    store.idempotency_prune(T0 + 1)
    assert store.idempotency_get("t", "key-1", 0.0) is None


def test_ids_are_a_prefix_and_24_hex_digits(db_path):
    import re

    from minibatch.store import new_id

    store = open_store(db_path)
    assert re.fullmatch(r"batch_[0-9a-f]{24}", submit(store).id)
    assert re.fullmatch(r"file-[0-9a-f]{24}", store.file_begin("t", None, 1, T0, "batch"))
    assert re.fullmatch(r"evt-[0-9a-f]{24}", new_id("evt", "-"))


def test_a_webhook_without_events_gets_every_batch_event(db_path):
    from minibatch.models import BATCH_EVENTS

    store = open_store(db_path)
    assert submit(store, webhook=WebhookIn(url=HOOK)).events() == list(BATCH_EVENTS)
    assert submit(store, webhook=WebhookIn(url=HOOK, events=["item.failed"])).events() == [
        "item.failed"]
    assert submit(store).events() == [] and submit(store).webhook_url is None


def test_a_batch_needs_items_unique_entry_ids_and_no_deep_nesting(db_path):
    store = open_store(db_path)
    deep: list = []
    for _ in range(200):
        deep = [deep]
    for items in ([], [{"input": 1, "entry_id": "a"}, {"input": 2, "entry_id": "a"}],
                  [{"input": deep}], [{"input": 1, "metadata": {"m": deep}}]):
        with pytest.raises(InvalidInput):
            store.batch_insert(tenant="t", kind="k", items=items, now=T0, max_attempts=1)
    unfinished = store.file_begin("t", "in.jsonl", 1, T0)
    for file_id in (unfinished, "file_nope"):
        with pytest.raises(InvalidInput):
            store.batch_insert(tenant="t", kind="k", items=[], input_file_id=file_id,
                               now=T0, max_attempts=1)
    assert store._one("SELECT count(*) FROM batches")[0] == 0
    ok = store.batch_insert(tenant="t", kind="k", now=T0, max_attempts=1, items=[
        {"input": 1, "entry_id": "a"}, {"input": 2, "entry_id": "b"}, {"input": 3},
        {"input": 4}])
    assert ok.total == ok.queued == 4


def test_a_tenants_queue_may_fill_up_to_its_limit_and_no_further(db_path):
    from minibatch.errors import TooManyRequests

    store = open_store(db_path)
    with pytest.raises(InvalidInput):  # larger than the limit by itself: split it
        submit(store, 6, max_queued=5)
    submit(store, 3, max_queued=5)
    submit(store, 2, max_queued=5)  # exactly the limit
    submit(store, 1, tenant="u", max_queued=5)  # another tenant's queue
    submit(store, 5, tenant="v", max_queued=5)  # a batch of exactly the limit
    with pytest.raises(TooManyRequests):
        submit(store, 1, max_queued=5)
    run_items(store, 2)  # two ran (ended or not, they are not queued)
    submit(store, 2, max_queued=5)
    assert store._one("SELECT count(*) FROM batches")[0] == 5


def test_a_refused_batch_ends_failed_with_no_items_and_sends_its_end(db_path):
    store = open_store(db_path)
    endpoint(store, "e")  # subscribed to batch.completed only
    store.endpoint_create("t", "f", "https://f.example/", ["batch.failed"], "secret_f",
                          "whsec_eA", T0)
    row = store.batch_insert_refused(tenant="t", kind="k", now=T0 + 1, metadata={"a": 1},
                                     dialect="openai", dialect_data={"errors": [1]},
                                     idempotency=("key", b"h", 200, lambda r: r.id.encode()))
    assert (row.status, row.total, row.completed_at, row.max_attempts) == (
        "failed", 0, T0 + 1, 1)
    assert row.data() == {"errors": [1]} and store.batch_get(row.id).metadata == {"a": 1}
    assert [(d.event, d.url) for d in deliveries_of(store, row)] == [
        ("batch.failed", "https://f.example/")]
    assert store.idempotency_get("t", "key", 0.0)[2] == row.id.encode()


def test_listings_filter_by_tenant_and_status_and_page_back_from_a_cursor(db_path):
    store = open_store(db_path)
    a1, b1, a2 = submit(store, tenant="a"), submit(store, tenant="b"), submit(store,
                                                                              tenant="a")
    store.batch_cancel(a2.id, None, T0)
    everyone, more = store.batches_list(None, status=None, limit=10, after=None)
    assert [b.id for b in everyone] == [a2.id, b1.id, a1.id] and not more
    page, _ = store.batches_list(None, status=None, limit=10, after=b1.id)
    assert [b.id for b in page] == [a1.id]
    page, _ = store.batches_list("a", status="cancelled", limit=10, after=None)
    assert [b.id for b in page] == [a2.id]
    rows = [submit(store, dialect="openai") for _ in range(4)]
    page, more = store.batch_rows_list("t", dialect="openai", after=None, limit=3,
                                       before=rows[0].id)
    assert [r.id for r in page] == [rows[3].id, rows[2].id, rows[1].id] and not more
    page, more = store.batch_rows_list("t", dialect="openai", after=None, limit=3,
                                       before=rows[2].id)
    assert [r.id for r in page] == [rows[3].id] and not more
    page, more = store.batch_rows_list("t", dialect="openai", after=None, limit=1,
                                       before=rows[1].id)
    assert [r.id for r in page] == [rows[2].id] and more  # an odd limit: not `limit | 1`
    with pytest.raises(InvalidInput):
        store.batch_rows_list("t", dialect="anthropic", after=rows[0].id, limit=3)
    with pytest.raises(InvalidInput):
        store.batch_rows_list("t", dialect="openai", after=None, limit=3, before="batch_x")


def test_cancelling_twice_changes_nothing_and_an_ended_batch_cannot_be_cancelled(db_path):
    from minibatch.errors import Conflict

    store = open_store(db_path)
    row = submit(store, 3)
    store.items_claim("k", 1, "o", T0, lease_s=30)
    batch, seq = store.batch_cancel(row.id, "t", T0 + 1)
    assert (batch.status, batch.metrics.cancelled, batch.metrics.running, seq) == (
        "cancelling", 2, 1, row.seq)
    store.batch_cancel(row.id, "t", T0 + 2)
    assert store.batch_row(row.id, "t").cancel_requested_at == T0 + 1
    assert store.batch_status(row.id) == "cancelling"
    done = submit(store)
    run_items(store, 1)
    with pytest.raises(Conflict):
        store.batch_cancel(done.id, None, T0)


def test_an_expired_batch_ends_its_queued_items_and_then_itself(db_path):
    store = open_store(db_path)
    row = submit(store, 3, expires_at=T0 + 10)
    later = submit(store, 1, expires_at=T0 + 11)
    never = submit(store, 1)
    store.items_claim("k", 1, "o", T0, lease_s=30)
    assert store.batches_expire(T0 + 9) == []
    assert store.batches_expire(T0 + 10) == [row.seq]
    assert store.batches_expire(T0 + 10) == []  # already expiring
    batch = store.batch_get(row.id)
    assert (batch.status, batch.metrics.expired, batch.metrics.running) == ("running", 2, 1)
    assert store.batch_get(later.id).status == "queued"
    claimed = store.items_claim("k", 5, "o", T0 + 10, lease_s=30)
    assert sorted(c.batch_seq for c in claimed) == [later.seq, never.seq]  # none of it
    store.items_rescue(T0 + 100)  # the running one's lease lapsed
    assert store.batch_get(row.id).status == "expired"
    assert store.batch_get(never.id).expires_at is None


def test_batches_of_a_kind_no_handler_knows_fail_their_queued_items(db_path):
    store = open_store(db_path)
    known = submit(store, 1)
    odd = store.batch_insert(tenant="t", kind="odd", items=[{"input": 0}, {"input": 1}],
                             now=T0, max_attempts=1)
    store.items_claim("odd", 1, "o", T0, lease_s=30)
    assert store.batches_fail_unknown_kinds(["k", "other"], T0 + 1) == [odd.id]
    batch = store.batch_get(odd.id)
    assert (batch.status, batch.metrics.failed, batch.metrics.running) == ("running", 1, 1)
    [failed] = store.items_page(odd.id, None, status="failed", limit=5, after=-1)[0]
    assert failed.error.code == "unknown_kind" and "'odd'" in failed.error.message
    assert store.batch_get(known.id).metrics.queued == 1
    assert store.batches_fail_unknown_kinds(["k", "odd"], T0 + 2) == []


def test_a_dead_owners_leases_expire_at_once_and_only_its_own(db_path):
    store = open_store(db_path)
    row = submit(store, 3)
    store.items_claim("k", 2, "dead", T0, lease_s=30)
    store.items_claim("k", 1, "live", T0, lease_s=30)
    assert sorted(store.lease_owners()) == ["dead", "live"]
    assert store.leases_expire("dead") == 2
    assert store.leases_expire("nobody") == 0
    assert store.items_rescue(T0 + 1) == 2
    assert store.lease_owners() == ["live"]
    assert store.leases_extend("live", T0 + 100) == 1
    assert store.leases_extend("dead", T0 + 100) == 0
    assert store.items_rescue(T0 + 99) == 0
    batch = store.batch_get(row.id)
    assert (batch.metrics.failed, batch.metrics.running) == (2, 1)  # one attempt each


def test_a_released_item_is_queued_again_from_now_with_its_attempt_not_counted(db_path):
    store = open_store(db_path)
    row = submit(store, 3)
    store.items_claim("k", 2, "o", T0, lease_s=30)
    store.items_claim("k", 1, "p", T0, lease_s=30)
    assert store.items_release("o", T0 + 5) == 2
    assert store.items_release("o", T0 + 5) == 0
    batch = store.batch_get(row.id)
    assert (batch.status, batch.metrics.queued, batch.metrics.running) == ("running", 2, 1)
    assert store.items_claim("k", 5, "q", T0 + 4, lease_s=30) == []  # due from T0 + 5
    again = store.items_claim("k", 5, "q", T0 + 5, lease_s=30)
    assert [c.item.attempt for c in again] == [1, 1]
    assert sorted(store.lease_owners()) == ["p", "q"]


def test_only_the_owner_of_a_claim_finishes_it_and_results_list_ended_items(db_path):
    store = open_store(db_path)
    row = submit(store, 4)
    claimed = store.items_claim("k", 3, "o", T0, lease_s=30)
    out = [Outcome(c.seq, c.batch_seq, c.token, "succeeded", b"1", None, 0.0)
           for c in claimed]
    assert store.items_finish(out[:1], "intruder", T0) == 0
    assert store.items_finish(out[:2], "o", T0) == 2
    assert store.items_finish(out[:2], "o", T0) == 0  # already written
    results = store.results_page(row.seq, -1, 10)
    assert [(r[0], r[3], r[4]) for r in results] == [(0, "succeeded", b"1"),
                                                     (1, "succeeded", b"1")]
    assert [r[0] for r in store.results_page(row.seq, 0, 10)] == [1]
    assert [r[0] for r in store.results_page(row.seq, -1, 1)] == [0]
    page, more = store.items_page(row.id, None, status="running", limit=5, after=-1)
    assert [i.index for i in page] == [2] and not more
    page, more = store.items_page(row.id, None, status="queued", limit=5, after=-1)
    assert [i.index for i in page] == [3] and not more


def test_a_retry_in_a_cancelling_or_expiring_batch_ends_there(db_path):
    store = open_store(db_path)
    for end in ("cancel", "expire"):
        row = store.batch_insert(tenant="t", kind=end, items=[{"input": 0}, {"input": 1}],
                                 now=T0, max_attempts=3, expires_at=T0 + 10)
        claimed = store.items_claim(end, 2, "o", T0, lease_s=30)
        if end == "cancel":
            store.batch_cancel(row.id, None, T0 + 1)
        else:
            store.batches_expire(T0 + 10)
        retry = [Outcome(c.seq, c.batch_seq, c.token, "queued", None,
                         error_bytes("x", "y"), T0 + 60) for c in claimed]
        store.items_finish(retry, "o", T0 + 11)
        batch = store.batch_get(row.id)
        assert batch.status == ("cancelled" if end == "cancel" else "expired"), end
        assert (batch.metrics.cancelled, batch.metrics.expired) == (
            (2, 0) if end == "cancel" else (0, 2)), end


def test_an_item_the_runner_saw_expire_makes_its_batch_expire(db_path):
    store = open_store(db_path)
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": 0}, {"input": 1}],
                             now=T0, max_attempts=3, expires_at=T0 + 10)
    [first] = store.items_claim("k", 1, "o", T0, lease_s=30)
    store.items_finish([Outcome(first.seq, first.batch_seq, first.token, "expired", None,
                                None, 0.0)], "o", T0 + 10)
    batch = store.batch_get(row.id)
    assert (batch.status, batch.metrics.expired, batch.metrics.queued) == ("expired", 2, 0)
    assert store.batch_row(row.id, None).expiring == 1


def test_a_keys_first_use_is_written_once_a_minute_has_passed_since_time_zero(db_path):
    store = open_store(db_path)
    store.tenant_create("t", b"k1", "secret_1", "whsec_eA", 0.0, key_id="key_1")
    store.tenant_create("t", b"k2", "secret_2", "whsec_eA", 0.0, key_id="key_2")
    assert store.tenant_by_key(b"k1", 59.5) == ("t", 0.0)
    assert store.tenant_by_key(b"k2", 60.5) == ("t", 60.5)
    assert [k["last_used_at"] for k in store.keys_list("t")] == [None, to_datetime(60.5)]
    assert store.tenant_by_key(b"k2", 120.0) == ("t", 60.5)  # 59.5 s later: not written
    assert store.keys_list("t")[1]["last_used_at"] == to_datetime(60.5)
    assert store.tenant_by_key(b"k2", 120.5) == ("t", 120.5)
    assert store.keys_list("t")[1]["last_used_at"] == to_datetime(120.5)


def test_an_openai_error_file_has_a_line_per_failed_cancelled_and_expired_item(db_path):
    store = open_store(db_path)
    row = submit(store, 4, dialect="openai", expires_at=T0 + 10)
    first, second = store.items_claim("k", 2, "o", T0, lease_s=30)
    store.items_finish([Outcome(first.seq, first.batch_seq, first.token, "failed", None,
                                error_bytes("x", "y"), 0.0)], "o", T0)
    store.batches_expire(T0 + 10)  # the two queued
    store.items_finish([Outcome(second.seq, second.batch_seq, second.token, "cancelled",
                                None, None, 0.0)], "o", T0 + 11)
    ended = store.batch_row(row.id, None)
    assert (ended.status, ended.failed, ended.cancelled, ended.expired) == (
        "expired", 1, 1, 2)
    files = store.batch_files(row.seq)
    assert set(files) == {"batch_error"}
    assert store.file_get(files["batch_error"], "t").lines == 4


def test_the_deliveries_still_to_send_are_counted(db_path):
    store = open_store(db_path)
    submit(store, 3, webhook=WebhookIn(url=HOOK, events=["item.succeeded"]))
    run_items(store, 3)
    assert store.deliveries_pending_count() == 3
    ok, *_ = store.deliveries_claim(T0, 2, lease_s=30)
    assert store.deliveries_pending_count() == 3  # sending ones too
    store.deliveries_record([AttemptRecord(ok[0], 1, True, 200, "", 5, None, None, T0 + 1,
                                           None, None, False)])
    assert store.deliveries_pending_count() == 2


def test_a_tenants_endpoints_get_the_events_they_subscribe_to_with_one_body(db_path):
    from minibatch.errors import NotFound

    store = open_store(db_path)
    done = endpoint(store, "done")
    store.endpoint_create("t", "fail", "https://f.example/", ["batch.failed"], "secret_f",
                          "whsec_eA", T0)
    both = store.endpoint_create("t", "both", "https://b.example/",
                                 ["batch.completed", "item.succeeded"], "secret_b",
                                 "whsec_eA", T0)
    store.endpoint_create("u", "theirs", "https://u.example/", ["batch.completed"],
                          "secret_u", "whsec_eA", T0)
    with pytest.raises(NotFound):
        store.endpoint_get(done.id, "u")
    with pytest.raises(InvalidInput):
        store.endpoints_list("u", after=done.id, limit=5)
    row = submit(store, webhook=WebhookIn(url=HOOK, events=["batch.completed"]))
    run_items(store, 1)
    made = deliveries_of(store, row)
    assert [(d.url, d.endpoint_id) for d in made] == [  # the batch's own, then by seq
        (HOOK, None), (HOOK, done.id), ("https://b.example/", both.id)]
    assert len({d.payload_bytes for d in made}) == 1  # one event, one body
    store.endpoint_delete(done.id, "t")
    with pytest.raises(NotFound):
        store.endpoint_get(done.id, "t")
    assert store.secrets_active("t", T0, done.id) == []
    assert [i for i, _ in store.secrets_active("t", T0, both.id)] == ["secret_b"]
    assert len(deliveries_of(store, row)) == 3  # those made keep going
    with pytest.raises(NotFound):
        store.endpoint_delete(done.id, "t")


def test_an_endpoint_update_writes_each_field_given_and_a_rotation_moves_updated_at(
        db_path):
    store = open_store(db_path)
    made = endpoint(store, "one")
    moved = store.endpoint_update(made.id, "t", T0 + 1, url="https://new.example/")
    assert (moved.name, moved.url, moved.updated_at) == ("one", "https://new.example/",
                                                         T0 + 1)
    assert moved.events() == ["batch.completed"] and moved.created_at == T0
    rotated = store.endpoint_rotate(made.id, "t", "secret_2", "whsec_eB", 60, T0 + 2)
    assert rotated.updated_at == T0 + 2
    assert [i for i, _ in store.secrets_active("t", T0 + 62, made.id)] == ["secret_2"]


def test_a_throughput_of_four_seconds_in_three_bars_is_two_seconds_a_bar(db_path):
    store = open_store(db_path)
    row = submit(store, 3)
    first, second = store.items_claim("k", 2, "o", T0, lease_s=30)
    store.items_finish([  # one succeeded and one failed in the same second: 2 ended
        Outcome(first.seq, first.batch_seq, first.token, "succeeded", b"1", None, 0.0),
        Outcome(second.seq, second.batch_seq, second.token, "failed", None,
                error_bytes("x", "y"), 0.0)], "o", T0)
    run_items(store, 1, now=T0 + 3)  # seconds T0 .. T0 + 3: 4 of them, ceil(4 / 3) = 2
    assert store.batch_throughput(row.seq, 3) == (int(T0), 2, [2, 1])
    assert store.batch_throughput(row.seq, 4) == (int(T0), 1, [2, 0, 0, 1])


def test_an_items_page_of_a_status_the_batch_has_none_of_is_empty(db_path):
    store = open_store(db_path)
    row = submit(store, 3)
    run_items(store, 1)
    assert store.items_page(row.id, None, status="failed", limit=5, after=-1) == ([], False)
    page, more = store.items_page(row.id, None, status="succeeded", limit=5, after=-1)
    assert [i.index for i in page] == [0] and not more
    with pytest.raises(InvalidInput):
        store.items_page(row.id, None, status="bogus", limit=5, after=-1)


def test_a_capped_batch_takes_no_more_than_its_slots_in_a_later_round(db_path):
    """Round one shares 6 as 2 each: the capped batch (3 slots) takes 2 and stays; the
    others have one item each and leave. Round two offers it 2, but it has 1 slot."""
    store = open_store(db_path)
    capped = submit(store, 10, concurrency=3)
    small = [submit(store, 1), submit(store, 1)]
    claimed = store.items_claim("k", 6, "o", T0, lease_s=30)
    assert sum(c.batch_seq == capped.seq for c in claimed) == 3
    assert sorted(c.batch_seq for c in claimed if c.batch_seq != capped.seq) == [
        b.seq for b in small]
    assert store.batch_get(capped.id).metrics.running == 3

