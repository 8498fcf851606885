"""All SQL: the schema and its migrations, one method per query, rows -> Structs.

Plain synchronous code on one apsw connection; the async side decides when a call is
long enough to go to a thread. Every state change is one `BEGIN IMMEDIATE` transaction
(`_tx`), and whatever it causes - batch counters, the terminal transition, the webhook
delivery rows - is written inside that same transaction.

Method names read noun first: `batch_insert`, `items_claim`, `items_finish`, ...
"""

from __future__ import annotations

import secrets as pysecrets
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import apsw
import msgspec

from . import models
from .errors import Conflict, InvalidInput, NotFound, StorageUnavailable
from .models import (
    Attempt,
    Batch,
    Delivery,
    DeliverySummary,
    Event,
    FailedWebhook,
    FileObject,
    Item,
    ItemError,
    ItemRecord,
    Metrics,
    WebhookInfo,
    to_datetime,
)

MIGRATIONS: list[str] = [
    # 1: the queue
    """
    CREATE TABLE batches (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        total INTEGER NOT NULL,
        queued INTEGER NOT NULL,
        running INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        cancelled INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        completed_at REAL,
        metadata BLOB,
        max_attempts INTEGER NOT NULL,
        item_timeout_s REAL,
        concurrency INTEGER
    );
    CREATE INDEX batches_tenant ON batches(tenant, seq);
    CREATE INDEX batches_open ON batches(kind) WHERE completed_at IS NULL;
    CREATE TABLE items (
        seq INTEGER PRIMARY KEY,
        batch INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        kind TEXT NOT NULL,
        entry_id TEXT,
        status TEXT NOT NULL,
        input BLOB NOT NULL,
        metadata BLOB,
        output BLOB,
        error BLOB,
        attempts INTEGER NOT NULL DEFAULT 0,
        run_at REAL NOT NULL,
        lease_until REAL,
        lease_owner TEXT
    );
    CREATE UNIQUE INDEX items_batch_idx ON items(batch, idx);
    CREATE UNIQUE INDEX items_entry ON items(batch, entry_id) WHERE entry_id IS NOT NULL;
    -- Partial indexes: the claim and the rescue each scan only the rows they want
    -- (measured 1.3x a composite index and 7.5x no index, shared/MEASURED.md).
    CREATE INDEX items_queued ON items(kind, run_at) WHERE status = 'queued';
    CREATE INDEX items_running ON items(lease_until) WHERE status = 'running';
    """,
    # 2: webhooks, tenants, files, idempotency
    """
    ALTER TABLE batches ADD COLUMN webhook_url TEXT;
    ALTER TABLE batches ADD COLUMN webhook_events TEXT;
    ALTER TABLE batches ADD COLUMN webhook_gone INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE tenants (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
    CREATE TABLE api_keys (
        key_hash BLOB PRIMARY KEY, tenant TEXT NOT NULL, created_at REAL NOT NULL
    );
    CREATE TABLE secrets (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, secret TEXT NOT NULL,
        created_at REAL NOT NULL, expires_at REAL
    );
    CREATE INDEX secrets_tenant ON secrets(tenant, created_at);
    CREATE TABLE deliveries (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        batch INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        event TEXT NOT NULL,
        url TEXT NOT NULL,
        payload BLOB NOT NULL,
        status TEXT NOT NULL,
        is_automatic INTEGER NOT NULL DEFAULT 1,
        signing_secret_id TEXT,
        attempt_count INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        next_attempt_at REAL,
        failure_reason_code TEXT,
        failure_detail TEXT,
        last_status_code INTEGER,
        last_error TEXT,
        last_attempt_at REAL,
        created_at REAL NOT NULL,
        completed_at REAL
    );
    CREATE INDEX deliveries_due ON deliveries(next_attempt_at) WHERE status = 'pending';
    CREATE INDEX deliveries_batch ON deliveries(batch);
    CREATE TABLE attempts (
        delivery INTEGER NOT NULL,
        attempt_number INTEGER NOT NULL,
        status_code INTEGER,
        response_body TEXT,
        response_time_ms INTEGER NOT NULL,
        error_message TEXT,
        is_automatic INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX attempts_delivery ON attempts(delivery);
    CREATE TABLE files (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT,
        bytes INTEGER NOT NULL, lines INTEGER NOT NULL, created_at REAL NOT NULL
    );
    CREATE TABLE file_lines (
        file TEXT NOT NULL, line INTEGER NOT NULL, entry_id TEXT, input BLOB NOT NULL,
        metadata BLOB, PRIMARY KEY (file, line)
    ) WITHOUT ROWID;
    CREATE TABLE idempotency (
        tenant TEXT NOT NULL, key TEXT NOT NULL, body_hash BLOB NOT NULL,
        status INTEGER NOT NULL, response BLOB NOT NULL, created_at REAL NOT NULL,
        PRIMARY KEY (tenant, key)
    );
    """,
]

ERROR_MESSAGE_CAP = 2000
CHUNK = 5000  # items encoded and inserted per executemany while submitting
_BATCH_COLS = (
    "seq, id, tenant, kind, status, total, queued, running, succeeded, failed, cancelled, "
    "created_at, started_at, completed_at, metadata, max_attempts, item_timeout_s, "
    "concurrency, webhook_url, webhook_events, webhook_gone"
)
_STORAGE_FAULTS = (apsw.FullError, apsw.IOError, apsw.ReadOnlyError, apsw.CantOpenError,
                   apsw.BusyError)
_decode = msgspec.json.decode
_encode = models.encoder.encode


class BatchRow(NamedTuple):
    seq: int
    id: str
    tenant: str
    kind: str
    status: str
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    created_at: float
    started_at: float | None
    completed_at: float | None
    metadata: bytes | None
    max_attempts: int
    item_timeout_s: float | None
    concurrency: int | None
    webhook_url: str | None
    webhook_events: str | None
    webhook_gone: int

    def events(self) -> list[str]:
        return _decode(self.webhook_events) if self.webhook_events else []


class Claimed(NamedTuple):
    """A claimed item and what the runner needs to run it."""

    item: Item
    seq: int
    batch_seq: int
    max_attempts: int
    timeout_s: float | None
    claimed_at: float


class Outcome(NamedTuple):
    """How one attempt ended, as the completer writes it."""

    seq: int
    batch_seq: int
    attempt: int
    status: str  # succeeded | failed | cancelled | queued (retry)
    output: bytes | None
    error: bytes | None
    run_at: float  # for a retry


def new_id(prefix: str) -> str:
    return f"{prefix}_{pysecrets.token_hex(12)}"


def item_id(seq: int) -> str:
    return f"item_{seq}"


def error_bytes(code: str, message: str) -> bytes:
    return _encode(ItemError(code, message[:ERROR_MESSAGE_CAP]))


def sanitize_url(url: str) -> str:
    """Drop userinfo and query values: the URL as a batch object shows it."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    query = urlencode([(k, "") for k, _ in parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class Store:
    """One SQLite database file (WAL) holding every batch, item, delivery and key."""

    def __init__(self, path: str, *, synchronous: str = "normal",
                 webhook_schedule: tuple[float, ...] = (0.0,)) -> None:
        self.path = path
        # A new delivery is due after the schedule's first delay, for len(schedule) attempts.
        self.webhook_attempts = len(webhook_schedule)
        self.webhook_first_delay = webhook_schedule[0]
        try:
            self.conn = apsw.Connection(path)
        except apsw.CantOpenError as exc:
            raise StorageUnavailable(f"cannot open database {path!r}: {exc}") from None
        self.conn.set_busy_timeout(10_000)
        if path != ":memory:":
            self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        self.conn.execute("PRAGMA temp_store=MEMORY")
        self.migrate()

    def close(self) -> None:
        self.conn.close()

    # -- transactions and schema ----------

    @contextmanager
    def _tx(self) -> Iterator[apsw.Cursor]:
        """One write transaction; storage faults become StorageUnavailable (503)."""
        cur = self.conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except _STORAGE_FAULTS as exc:
            raise StorageUnavailable(f"database cannot be written: {exc}") from None
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:  # COMMIT may itself have failed
                self.conn.execute("ROLLBACK")
            if isinstance(exc, _STORAGE_FAULTS):
                raise StorageUnavailable(f"database cannot be written: {exc}") from None
            raise

    def _one(self, sql: str, args: tuple = ()) -> Any:
        for row in self.conn.execute(sql, args):
            return row
        return None

    def schema_version(self) -> int:
        return self._one("PRAGMA user_version")[0]

    def migrate(self) -> None:
        """Apply each numbered migration not yet recorded in `user_version`."""
        with self._tx() as cur:
            version = self.schema_version()
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                cur.execute(script)
                cur.execute(f"PRAGMA user_version={number}")

    def schema_sql(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")]

    # -- batches ----------

    def batch_insert(
        self,
        *,
        tenant: str,
        kind: str,
        items: Iterable[Any],
        now: float,
        metadata: dict | None = None,
        webhook: models.WebhookIn | None = None,
        max_attempts: int,
        item_timeout_s: float | None = None,
        concurrency: int | None = None,
        input_file_id: str | None = None,
        idempotency: tuple[str, bytes, int, Any] | None = None,
    ) -> BatchRow:
        """Insert a batch and its items in one transaction, reading `items` in chunks.

        `items` holds item dicts or `ItemIn`s; anything invalid raises InvalidInput and
        the transaction is rolled back, so nothing is written.
        `idempotency` is (key, body_hash, status, response-builder): the key is stored in
        the same transaction as the batch.
        """
        batch_id = new_id("batch")
        events = None
        if webhook is not None:
            events = _encode(webhook.events or list(models.BATCH_EVENTS)).decode()
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO batches (id, tenant, kind, status, total, queued, created_at,"
                " metadata, max_attempts, item_timeout_s, concurrency, webhook_url,"
                " webhook_events) VALUES (?,?,?, 'queued', 0, 0, ?,?,?,?,?,?,?)",
                (batch_id, tenant, kind, now, _encode(metadata or {}), max_attempts,
                 item_timeout_s, concurrency, webhook.url if webhook else None, events),
            )
            seq = self.conn.last_insert_rowid()
            if input_file_id is not None:
                total = self._items_from_file(cur, seq, kind, tenant, input_file_id, now)
            else:
                total = self._items_from_iterable(cur, seq, kind, items, now)
            if total == 0:
                raise InvalidInput("a batch needs at least one item",
                                   [{"field": "items", "message": "empty"}])
            cur.execute("UPDATE batches SET total=?, queued=? WHERE seq=?", (total, total, seq))
            row = self._batch_row(seq)
            if idempotency is not None:
                self._idempotency_put(cur, tenant, idempotency, row, now)
        return row

    def _items_from_iterable(self, cur: apsw.Cursor, seq: int, kind: str,
                             items: Iterable[Any], now: float) -> int:
        seen: set[str] = set()
        index = 0
        chunk: list[tuple] = []
        for raw in items:
            item = _as_item_in(raw, index)
            if item.entry_id is not None:
                if item.entry_id in seen:
                    raise InvalidInput(
                        f"duplicate entry_id {item.entry_id!r} at item {index}",
                        [{"field": f"items[{index}].entry_id", "message": "duplicate"}])
                seen.add(item.entry_id)
            try:
                encoded = _encode(item.input)
                meta = None if item.metadata is None else _encode(item.metadata)
            except (TypeError, msgspec.EncodeError, RecursionError) as exc:
                raise InvalidInput(
                    f"item {index} is not JSON-encodable: {exc}",
                    [{"field": f"items[{index}].input", "message": str(exc)}]) from None
            chunk.append((seq, index, kind, item.entry_id, encoded, meta, now))
            index += 1
            if len(chunk) >= CHUNK:
                self._items_write(cur, chunk)
                chunk = []
        if chunk:
            self._items_write(cur, chunk)
        return index

    @staticmethod
    def _items_write(cur: apsw.Cursor, rows: list[tuple]) -> None:
        cur.executemany(
            "INSERT INTO items (batch, idx, kind, entry_id, status, input, metadata, run_at)"
            " VALUES (?,?,?,?, 'queued', ?,?,?)", rows)

    def _items_from_file(self, cur: apsw.Cursor, seq: int, kind: str, tenant: str,
                         file_id: str, now: float) -> int:
        if self._one("SELECT 1 FROM files WHERE id=? AND tenant=?", (file_id, tenant)) is None:
            raise InvalidInput(f"no file {file_id!r}",
                               [{"field": "input_file_id", "message": "unknown file"}])
        cur.execute(
            "INSERT INTO items (batch, idx, kind, entry_id, status, input, metadata, run_at)"
            " SELECT ?, line - 1, ?, entry_id, 'queued', input, metadata, ?"
            " FROM file_lines WHERE file=? ORDER BY line", (seq, kind, now, file_id))
        return self.conn.changes()

    def _batch_row(self, seq: int) -> BatchRow:
        return BatchRow(*self._one(f"SELECT {_BATCH_COLS} FROM batches WHERE seq=?", (seq,)))

    def _batch_row_by_id(self, batch_id: str, tenant: str | None) -> BatchRow:
        row = self._one(f"SELECT {_BATCH_COLS} FROM batches WHERE id=?", (batch_id,))
        if row is None or (tenant is not None and row[2] != tenant):
            raise NotFound(f"no batch {batch_id!r}")
        return BatchRow(*row)

    def batch_get(self, batch_id: str, tenant: str | None = None, *,
                  with_deliveries: bool = True) -> Batch:
        row = self._batch_row_by_id(batch_id, tenant)
        batch = batch_struct(row)
        if with_deliveries:
            batch.deliveries, batch.failed_webhooks = self._delivery_summary(row.seq)
        return batch

    def batch_status(self, batch_id: str) -> str:
        return self._batch_row_by_id(batch_id, None).status

    def batches_list(self, tenant: str | None, *, status: str | None, limit: int,
                     after: str | None) -> tuple[list[Batch], bool]:
        """Newest first; `after` is the id of the last batch of the previous page."""
        where, args = ["1=1"], []
        if tenant is not None:
            where.append("tenant=?")
            args.append(tenant)
        if status is not None:
            where.append("status=?")
            args.append(status)
        if after is not None:
            row = self._one("SELECT seq, tenant FROM batches WHERE id=?", (after,))
            if row is None or (tenant is not None and row[1] != tenant):
                raise InvalidInput(f"unknown cursor {after!r}",
                                   [{"field": "after", "message": "unknown cursor"}])
            where.append("seq<?")
            args.append(row[0])
        rows = self.conn.execute(
            f"SELECT {_BATCH_COLS} FROM batches WHERE {' AND '.join(where)}"
            " ORDER BY seq DESC LIMIT ?", (*args, limit + 1)).fetchall()
        batches = [batch_struct(BatchRow(*r)) for r in rows[:limit]]
        return batches, len(rows) > limit

    def batch_cancel(self, batch_id: str, tenant: str | None, now: float) -> tuple[Batch, int]:
        """Cancel queued items now; running ones end as their workers stop.

        Returns the batch and its seq (the runner interrupts that batch's running items).
        """
        with self._tx() as cur:
            row = self._batch_row_by_id(batch_id, tenant)
            if row.status in models.BATCH_TERMINAL:
                raise Conflict(f"batch {batch_id} is already {row.status}")
            if row.status != "cancelling":
                cur.execute("UPDATE batches SET status='cancelling' WHERE seq=?", (row.seq,))
                self._cancel_queued(cur, row.seq, now)
        return self.batch_get(batch_id, tenant), row.seq

    def _cancel_queued(self, cur: apsw.Cursor, batch_seq: int, now: float) -> None:
        cur.execute("UPDATE items SET status='cancelled' WHERE batch=? AND status='queued'",
                    (batch_seq,))
        n = self.conn.changes()
        cur.execute("UPDATE batches SET queued=queued-?, cancelled=cancelled+? WHERE seq=?",
                    (n, n, batch_seq))
        self._batch_finish_if_done(cur, batch_seq, now)

    def batches_fail_unknown_kinds(self, kinds: Iterable[str], now: float) -> list[str]:
        """Fail the queued items of open batches whose kind has no handler here."""
        known = list(kinds)
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT seq, id, kind FROM batches WHERE completed_at IS NULL"
                f" AND kind NOT IN ({','.join('?' * len(known))})", known).fetchall()
            for seq, _, kind in rows:
                err = error_bytes("unknown_kind", f"no handler for kind {kind!r} on this instance")
                cur.execute("UPDATE items SET status='failed', error=? WHERE batch=?"
                            " AND status='queued'", (err, seq))
                n = self.conn.changes()
                cur.execute("UPDATE batches SET queued=queued-?, failed=failed+? WHERE seq=?",
                            (n, n, seq))
                self._batch_finish_if_done(cur, seq, now)
        return [r[1] for r in rows]

    def _batch_finish_if_done(self, cur: apsw.Cursor, seq: int, now: float) -> None:
        """The terminal transition, and its webhook delivery, in the caller's transaction."""
        row = self._batch_row(seq)
        if row.completed_at is not None or row.queued or row.running:
            return
        if row.status == "cancelling":
            status = "cancelled"
        else:
            status = "completed" if row.succeeded else "failed"
        cur.execute("UPDATE batches SET status=?, completed_at=? WHERE seq=?", (status, now, seq))
        event = f"batch.{status}"
        if row.webhook_url and not row.webhook_gone and event in row.events():
            data = batch_struct(self._batch_row(seq))
            self._delivery_insert(cur, row, event, _encode(Event(event, to_datetime(now), data)),
                                  now)

    # -- items: claim, heartbeat, finish, rescue ----------

    def items_claim(self, kind: str, limit: int, owner: str, now: float,
                    lease_s: float) -> list[Claimed]:
        """Claim up to `limit` due items of `kind`, each with a lease of `lease_s`.

        A batch's own `concurrency` caps its running items: candidates beyond a batch's
        free slots are left queued.
        """
        with self._tx() as cur:
            candidates = cur.execute(
                "SELECT seq, batch FROM items WHERE status='queued' AND kind=? AND run_at<=?"
                " AND batch NOT IN (SELECT seq FROM batches WHERE completed_at IS NULL"
                " AND concurrency IS NOT NULL AND running >= concurrency)"
                " ORDER BY run_at, seq LIMIT ?", (kind, now, limit)).fetchall()
            if not candidates:
                return []
            batches = {seq: self._batch_row(seq) for seq in {b for _, b in candidates}}
            room = {seq: (r.concurrency - r.running if r.concurrency else limit)
                    for seq, r in batches.items()}
            chosen = []
            for seq, b in candidates:
                if room[b] > 0:
                    room[b] -= 1
                    chosen.append(seq)
            rows = cur.execute(
                "UPDATE items SET status='running', attempts=attempts+1, lease_until=?,"
                f" lease_owner=? WHERE seq IN ({','.join('?' * len(chosen))})"
                " RETURNING seq, batch, idx, entry_id, input, metadata, attempts",
                (now + lease_s, owner, *chosen)).fetchall()
            per_batch = Counter(r[1] for r in rows)
            for b, n in per_batch.items():
                cur.execute(
                    "UPDATE batches SET queued=queued-?, running=running+?,"
                    " status=CASE status WHEN 'queued' THEN 'running' ELSE status END,"
                    " started_at=coalesce(started_at, ?) WHERE seq=?", (n, n, now, b))
        claimed = []
        for seq, b, idx, entry_id, inp, meta, attempts in rows:
            batch = batches[b]
            item = Item(id=item_id(seq), batch_id=batch.id, entry_id=entry_id, index=idx,
                        input=_decode(inp), metadata=None if meta is None else _decode(meta),
                        attempt=attempts)
            claimed.append(Claimed(item, seq, b, batch.max_attempts, batch.item_timeout_s, now))
        return claimed

    def leases_extend(self, owner: str, until: float) -> int:
        with self._tx() as cur:
            cur.execute("UPDATE items SET lease_until=? WHERE status='running' AND lease_owner=?",
                        (until, owner))
            return self.conn.changes()

    def leases_expire(self, owner: str) -> int:
        """Mark a dead owner's leases expired, so the rescuer takes them now."""
        with self._tx() as cur:
            cur.execute("UPDATE items SET lease_until=0 WHERE status='running' AND lease_owner=?",
                        (owner,))
            return self.conn.changes()

    def items_release(self, owner: str, now: float) -> int:
        """Hand an owner's running items back to the queue; the attempt is not counted."""
        with self._tx() as cur:
            rows = cur.execute(
                "UPDATE items SET status='queued', attempts=attempts-1, run_at=?,"
                " lease_until=NULL, lease_owner=NULL WHERE status='running' AND lease_owner=?"
                " RETURNING batch", (now, owner)).fetchall()
            self._apply_deltas(cur, {b: Counter(queued=n) for b, n in
                                     Counter(r[0] for r in rows).items()}, now)
        return len(rows)

    def lease_owners(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT lease_owner FROM items WHERE status='running'")]

    def items_finish(self, outcomes: list[Outcome], owner: str, now: float) -> int:
        """Write attempt outcomes in one transaction; returns how many were applied.

        Each write is guarded by the lease (`lease_owner` and `attempts` as claimed): an
        outcome whose lease was lost is discarded, so an item has exactly one outcome.
        """
        with self._tx() as cur:
            written = cur.executemany(
                "UPDATE items SET status=?, output=?, error=?, run_at=?, lease_until=NULL"
                " WHERE seq=? AND status='running' AND lease_owner=? AND attempts=?"
                " RETURNING batch, seq, status",
                [(o.status, o.output, o.error, o.run_at, o.seq, owner, o.attempt)
                 for o in outcomes]).fetchall()
            deltas: dict[int, Counter] = {}
            for b, _, status in written:
                if b not in deltas:
                    deltas[b] = Counter()
                deltas[b][status] += 1
            self._apply_deltas(cur, deltas, now)
            finished = [(b, seq) for b, seq, status in written
                        if status in ("succeeded", "failed")]
            if finished:
                self._item_events(cur, finished, now)
        return len(written)

    def _apply_deltas(self, cur: apsw.Cursor, deltas: dict[int, Counter], now: float) -> None:
        """Move finished items from running into their new counters, then settle batches."""
        for b, d in deltas.items():
            cur.execute(
                "UPDATE batches SET running=running-?, queued=queued+?, succeeded=succeeded+?,"
                " failed=failed+?, cancelled=cancelled+? WHERE seq=?",
                (sum(d.values()), d["queued"], d["succeeded"], d["failed"], d["cancelled"], b))
            if d["queued"] and self._one("SELECT status FROM batches WHERE seq=?",
                                         (b,))[0] == "cancelling":
                self._cancel_queued(cur, b, now)  # a retry in a cancelled batch ends here
            else:
                self._batch_finish_if_done(cur, b, now)

    def _item_events(self, cur: apsw.Cursor, finished: list[tuple[int, int]], now: float) -> None:
        rows: dict[int, BatchRow] = {}
        for b, seq in finished:
            row = rows.get(b) or rows.setdefault(b, self._batch_row(b))
            if not row.webhook_url or row.webhook_gone:
                continue
            record = self.item_record(seq, row.id)
            event = f"item.{record.status}"
            if event in row.events():
                self._delivery_insert(
                    cur, row, event, _encode(Event(event, to_datetime(now), record)), now)

    def items_rescue(self, now: float) -> int:
        """Put items whose lease expired back in the queue, counting the attempt."""
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT i.seq, i.batch, i.attempts, b.max_attempts FROM items i"
                " JOIN batches b ON b.seq = i.batch"
                " WHERE i.status='running' AND i.lease_until < ?", (now,)).fetchall()
            deltas: dict[int, Counter] = {}
            lost = error_bytes("lease_expired", "the worker running this item stopped"
                               " (its lease expired)")
            for seq, b, attempts, max_attempts in rows:
                status = "failed" if attempts >= max_attempts else "queued"
                cur.execute(
                    "UPDATE items SET status=?, error=?, run_at=?, lease_until=NULL WHERE seq=?",
                    (status, lost, now, seq))
                deltas.setdefault(b, Counter())[status] += 1
            self._apply_deltas(cur, deltas, now)
        return len(rows)

    def item_record(self, seq: int, batch_id: str) -> ItemRecord:
        row = self._one("SELECT seq, idx, entry_id, status, input, output, error, attempts,"
                        " metadata FROM items WHERE seq=?", (seq,))
        return _item_record(row, batch_id)

    def items_page(self, batch_id: str, tenant: str | None, *, status: str | None,
                   limit: int, after: int) -> tuple[list[ItemRecord], bool]:
        """Items in submission order after index `after` (exclusive)."""
        row = self._batch_row_by_id(batch_id, tenant)
        sql = ("SELECT seq, idx, entry_id, status, input, output, error, attempts, metadata"
               " FROM items WHERE batch=? AND idx>?")
        args: list[Any] = [row.seq, after]
        if status is not None:
            sql += " AND status=?"
            args.append(status)
        rows = self.conn.execute(sql + " ORDER BY idx LIMIT ?", (*args, limit + 1)).fetchall()
        return [_item_record(r, row.id) for r in rows[:limit]], len(rows) > limit

    def results_page(self, batch_seq: int, after: int, limit: int) -> list[tuple]:
        """Raw result rows (idx, seq, entry_id, status, output, error, attempts) after `after`."""
        return self.conn.execute(
            "SELECT idx, seq, entry_id, status, output, error, attempts FROM items"
            " WHERE batch=? AND idx>? AND status IN ('succeeded','failed','cancelled')"
            " ORDER BY idx LIMIT ?", (batch_seq, after, limit)).fetchall()

    def batch_seq(self, batch_id: str, tenant: str | None) -> int:
        return self._batch_row_by_id(batch_id, tenant).seq

    def batches_cancelling(self, seqs: Iterable[int]) -> list[int]:
        seqs = list(seqs)
        if not seqs:
            return []
        return [r[0] for r in self.conn.execute(
            f"SELECT seq FROM batches WHERE status IN ('cancelling','cancelled')"
            f" AND seq IN ({','.join('?' * len(seqs))})", seqs)]

    # -- deliveries ----------

    def _delivery_insert(self, cur: apsw.Cursor, row: BatchRow, event: str, payload: bytes,
                         now: float) -> None:
        cur.execute(
            "INSERT INTO deliveries (id, batch, tenant, event, url, payload, status,"
            " max_attempts, next_attempt_at, created_at) VALUES (?,?,?,?,?,?, 'pending', ?,?,?)",
            (new_id("msg"), row.seq, row.tenant, event, row.webhook_url, payload,
             self.webhook_attempts, now + self.webhook_first_delay, now))

    def deliveries_claim(self, now: float, limit: int, lease_s: float) -> list[tuple]:
        """Due deliveries, leased by pushing `next_attempt_at` past the attempt's timeout.

        A process that dies mid-attempt leaves the delivery due again once that passes.
        """
        with self._tx() as cur:
            return cur.execute(
                "UPDATE deliveries SET next_attempt_at=? WHERE seq IN (SELECT seq FROM"
                " deliveries WHERE status='pending' AND next_attempt_at<=?"
                " ORDER BY next_attempt_at LIMIT ?)"
                " RETURNING seq, id, tenant, url, payload, attempt_count, max_attempts, batch,"
                " is_automatic", (now + lease_s, now, limit)).fetchall()

    def deliveries_record(self, records: list) -> None:
        """Record attempts (delivery.AttemptRecord) and what follows each: done, failed,
        or the time of the next attempt. One transaction for the group."""
        updates = []
        for r in records:
            if r.failure is None:
                status = "succeeded"
            elif r.next_attempt_at is None:
                status = "failed"
            else:
                status = "pending"
            final_failure = status == "failed"
            updates.append((status, r.attempt_number, r.secret_id, r.next_attempt_at,
                            r.failure if final_failure else None,
                            r.error if final_failure else None, r.status_code, r.error, r.now,
                            None if status == "pending" else r.now, r.seq))
        with self._tx() as cur:
            cur.executemany("INSERT INTO attempts VALUES (?,?,?,?,?,?,?,?)",
                            [(r.seq, r.attempt_number, r.status_code, r.response_body,
                              r.response_time_ms, r.error, r.is_automatic, r.now)
                             for r in records])
            cur.executemany(
                "UPDATE deliveries SET status=?, attempt_count=?, signing_secret_id=?,"
                " next_attempt_at=?, failure_reason_code=?, failure_detail=?,"
                " last_status_code=?, last_error=?, last_attempt_at=?, completed_at=?"
                " WHERE seq=?", updates)
            for r in records:
                if r.gone:
                    self._deliveries_end_gone(cur, r.seq, r.now)

    def _deliveries_end_gone(self, cur: apsw.Cursor, seq: int, now: float) -> None:
        """410 Gone: other pending deliveries of the batch to that URL end, none follow."""
        batch, url = self._one("SELECT batch, url FROM deliveries WHERE seq=?", (seq,))
        cur.execute(
            "UPDATE deliveries SET status='failed', failure_reason_code='endpoint_gone',"
            " failure_detail='an earlier delivery to this URL was answered 410 Gone',"
            " next_attempt_at=NULL, completed_at=? WHERE batch=? AND url=? AND status='pending'",
            (now, batch, url))
        cur.execute("UPDATE batches SET webhook_gone=1 WHERE seq=?", (batch,))

    def delivery_redeliver(self, delivery_id: str, tenant: str | None, now: float) -> Delivery:
        """Manual redelivery: the same frozen bytes and webhook-id, sent again now."""
        with self._tx() as cur:
            row = self._one("SELECT seq, tenant, max_attempts, attempt_count FROM deliveries"
                            " WHERE id=?", (delivery_id,))
            if row is None or (tenant is not None and row[1] != tenant):
                raise NotFound(f"no delivery {delivery_id!r}")
            cur.execute(
                "UPDATE deliveries SET status='pending', is_automatic=0, next_attempt_at=?,"
                " max_attempts=attempt_count+1, completed_at=NULL, failure_reason_code=NULL,"
                " failure_detail=NULL WHERE seq=?", (now, row[0]))
        return self.deliveries_of(seq=row[0])[0]

    def deliveries_of(self, *, batch_seq: int | None = None, seq: int | None = None
                      ) -> list[Delivery]:
        """Deliveries of a batch (oldest first) or one delivery, each with its attempts."""
        where, arg = ("batch=?", batch_seq) if seq is None else ("d.seq=?", seq)
        rows = self.conn.execute(
            "SELECT d.seq, d.id, b.id, event, url, payload, d.status, is_automatic,"
            " signing_secret_id, attempt_count, d.max_attempts, next_attempt_at,"
            " failure_reason_code, failure_detail, d.created_at, d.completed_at"
            f" FROM deliveries d JOIN batches b ON b.seq=d.batch WHERE {where} ORDER BY d.seq",
            (arg,)).fetchall()
        out = []
        for r in rows:
            attempts = [
                Attempt(attempt_number=a[0], status_code=a[1], response_body=a[2],
                        response_time_ms=a[3], error_message=a[4], is_automatic=bool(a[5]),
                        created_at=to_datetime(a[6]))
                for a in self.conn.execute(
                    "SELECT attempt_number, status_code, response_body, response_time_ms,"
                    " error_message, is_automatic, created_at FROM attempts WHERE delivery=?"
                    " ORDER BY rowid", (r[0],))]
            out.append(Delivery(
                id=r[1], batch_id=r[2], event=r[3], url=r[4], payload_bytes=r[5].decode(),
                status=r[6], is_automatic=bool(r[7]), signing_secret_id=r[8],
                attempt_count=r[9], max_attempts=r[10],
                next_attempt_at=to_datetime(r[11]) if r[6] == "pending" else None,
                failure_reason_code=r[12], failure_detail=r[13],
                created_at=to_datetime(r[14]), completed_at=to_datetime(r[15]),
                attempts=attempts))
        return out

    def deliveries_pending_count(self) -> int:
        return self._one("SELECT count(*) FROM deliveries WHERE status='pending'")[0]

    def _delivery_summary(self, batch_seq: int) -> tuple[DeliverySummary, list[FailedWebhook]]:
        summary = DeliverySummary()
        for status, n in self.conn.execute(
                "SELECT status, count(*) FROM deliveries WHERE batch=? GROUP BY status",
                (batch_seq,)):
            setattr(summary, status, n)
            summary.total += n
        if not summary.total:
            return summary, []
        last = self._one("SELECT last_status_code, last_error, last_attempt_at FROM deliveries"
                         " WHERE batch=? AND last_attempt_at IS NOT NULL"
                         " ORDER BY last_attempt_at DESC LIMIT 1", (batch_seq,))
        if last:
            summary.last_status_code, summary.last_error = last[0], last[1]
            summary.last_attempt_at = to_datetime(last[2])
        failed = [FailedWebhook(delivery_id=r[0], event=r[1], attempt_count=r[2],
                                http_status=r[3], error_message=r[4],
                                created_at=to_datetime(r[5]))
                  for r in self.conn.execute(
                      "SELECT id, event, attempt_count, last_status_code,"
                      " coalesce(failure_detail, last_error), created_at FROM deliveries"
                      " WHERE batch=? AND status='failed' ORDER BY seq", (batch_seq,))]
        return summary, failed

    # -- tenants, keys, secrets ----------

    def tenant_create(self, name: str, key_hash: bytes, secret_id: str, secret: str,
                      now: float) -> None:
        """A tenant (if new), one more API key for it, and its first secret (if none)."""
        with self._tx() as cur:
            cur.execute("INSERT OR IGNORE INTO tenants VALUES (?,?)", (name, now))
            cur.execute("INSERT INTO api_keys VALUES (?,?,?)", (key_hash, name, now))
            if self._one("SELECT 1 FROM secrets WHERE tenant=?", (name,)) is None:
                cur.execute("INSERT INTO secrets VALUES (?,?,?,?,NULL)",
                            (secret_id, name, secret, now))

    def tenant_by_key(self, key_hash: bytes) -> str | None:
        row = self._one("SELECT tenant FROM api_keys WHERE key_hash=?", (key_hash,))
        return row[0] if row else None

    def secrets_active(self, tenant: str, now: float) -> list[tuple[str, str]]:
        """(id, secret) pairs that sign now, the primary (newest) first."""
        return self.conn.execute(
            "SELECT id, secret FROM secrets WHERE tenant=? AND (expires_at IS NULL OR"
            " expires_at > ?) ORDER BY created_at DESC, rowid DESC", (tenant, now)).fetchall()

    def secret_rotate(self, tenant: str, secret_id: str, secret: str, overlap_s: float,
                      now: float) -> tuple[str | None, float | None]:
        """Make a new primary; the previous one keeps signing for `overlap_s`."""
        with self._tx() as cur:
            active = self.secrets_active(tenant, now)
            previous = active[0][0] if active else None
            expires = now + overlap_s if previous else None
            cur.execute("UPDATE secrets SET expires_at=? WHERE tenant=? AND"
                        " (expires_at IS NULL OR expires_at > ?)", (expires, tenant, expires))
            cur.execute("INSERT INTO secrets VALUES (?,?,?,?,NULL)", (secret_id, tenant, secret,
                                                                     now + 1e-6))
        return previous, expires

    # -- files and idempotency ----------

    def file_insert(self, tenant: str, filename: str | None, size: int,
                    lines: Iterable[tuple], now: float,
                    idempotency: tuple[str, bytes, int, Any] | None = None) -> FileObject:
        """Store a file's lines, (line, entry_id, input, metadata) each, in one transaction.

        `lines` may raise InvalidInput part way (a bad line): nothing is then written.
        """
        file_id = new_id("file")
        with self._tx() as cur:
            cur.execute("INSERT INTO files VALUES (?,?,?,?,0,?)",
                        (file_id, tenant, filename, size, now))
            cur.executemany("INSERT INTO file_lines VALUES (?,?,?,?,?)",
                            ((file_id, *line) for line in lines))
            count = self._one("SELECT count(*) FROM file_lines WHERE file=?", (file_id,))[0]
            if count == 0:
                raise InvalidInput("the file has no items", [{"line": 1, "message": "empty"}])
            cur.execute("UPDATE files SET lines=? WHERE id=?", (count, file_id))
            file = FileObject(id=file_id, bytes=size, lines=count, filename=filename,
                              created_at=to_datetime(now))
            if idempotency is not None:
                self._idempotency_put(cur, tenant, idempotency, file, now)
        return file

    def _idempotency_put(self, cur: apsw.Cursor, tenant: str,
                         idempotency: tuple[str, bytes, int, Any], created: Any,
                         now: float) -> None:
        key, body_hash, status, build = idempotency
        cur.execute("INSERT OR REPLACE INTO idempotency VALUES (?,?,?,?,?,?)",
                    (tenant, key, body_hash, status, build(created), now))

    def idempotency_get(self, tenant: str, key: str, since: float) -> tuple | None:
        return self._one("SELECT body_hash, status, response FROM idempotency WHERE tenant=?"
                         " AND key=? AND created_at>=?", (tenant, key, since))

    def idempotency_prune(self, before: float) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM idempotency WHERE created_at<?", (before,))

    # -- metrics ----------

    def counts(self) -> dict[str, dict[str, int]]:
        """Totals for /metrics: items by status, deliveries by status (all tenants)."""
        items = dict(self.conn.execute("SELECT status, count(*) FROM items GROUP BY status"))
        deliveries = dict(self.conn.execute(
            "SELECT status, count(*) FROM deliveries GROUP BY status"))
        return {"items": items, "deliveries": deliveries}


def _as_item_in(raw: Any, index: int) -> models.ItemIn:
    if isinstance(raw, models.ItemIn):
        return raw
    if not isinstance(raw, dict):
        raise InvalidInput(f"item {index} must be a dict with an 'input' key",
                           [{"field": f"items[{index}]", "message": "not an object"}])
    try:
        return msgspec.convert(raw, models.ItemIn)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"item {index}: {exc}",
                           [{"field": f"items[{index}]", "message": str(exc)}]) from None


def _item_record(row: tuple, batch_id: str) -> ItemRecord:
    seq, idx, entry_id, status, inp, out, err, attempts, meta = row
    return ItemRecord(
        id=item_id(seq), batch_id=batch_id, entry_id=entry_id, index=idx, status=status,
        input=_decode(inp), output=None if out is None else _decode(out),
        error=None if err is None else _decode(err, type=ItemError), attempts=attempts,
        metadata=None if meta is None else _decode(meta))


def batch_struct(row: BatchRow) -> Batch:
    """A batch row as the public Batch object (without its delivery summary)."""
    path = f"/v1/batches/{row.id}"
    terminal = row.status in models.BATCH_TERMINAL
    duration = None
    if row.started_at is not None and row.completed_at is not None:
        duration = int((row.completed_at - row.started_at) * 1000)
    webhook = None
    if row.webhook_url:
        webhook = WebhookInfo(url=sanitize_url(row.webhook_url), events=row.events())
    return Batch(
        id=row.id, kind=row.kind, status=row.status,
        metrics=Metrics(row.total, row.queued, row.running, row.succeeded, row.failed,
                        row.cancelled),
        created_at=to_datetime(row.created_at), started_at=to_datetime(row.started_at),
        completed_at=to_datetime(row.completed_at), duration_ms=duration,
        metadata=_decode(row.metadata) if row.metadata else {},
        polling_url=path, cancel_url=None if terminal else f"{path}/cancel",
        results_url=f"{path}/results", webhook=webhook)
