"""Batches: insert (with their items), read, list, cancel, and the terminal transition."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import apsw
import msgspec

from .. import models
from ..errors import Conflict, InvalidInput, NotFound, TooManyRequests
from ..models import MAX_NESTING, Batch, DeliverySummary, too_deep
from .base import StoreBase
from .rows import (
    BATCH_COLS,
    BatchRow,
    batch_struct,
    encode,
    error_bytes,
    event_payload,
    items_in,
    new_id,
)

CHUNK = 5000  # items encoded and inserted per executemany while submitting
QUEUE_RETRY_AFTER_S = 10.0  # the Retry-After of a submit refused for a full queue


class BatchQueries(StoreBase):
    # A batch's seq: past every batch, and past every deleted batch whose rows are still
    # being removed (retention.py), which must never lend its seq to a new batch (SQLite
    # reuses the highest rowid once its row is deleted). PostgreSQL's is a sequence.
    _next_batch_seq = ("(SELECT max(coalesce((SELECT max(seq) FROM batches), 0),"
                       " coalesce((SELECT max(batch) FROM doomed), 0)) + 1)")

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
        expires_at: float | None = None,
        dialect: str = "native",
        dialect_data: dict | None = None,
        id_prefix: str = "batch",
        max_queued: int | None = None,
    ) -> BatchRow:
        """Insert a batch and its items in one transaction, reading `items` in chunks.

        `items` holds item dicts or `ItemIn`s; anything invalid raises InvalidInput and
        the transaction is rolled back, so nothing is written.
        `idempotency` is (key, body_hash, status, response-builder): the key is stored in
        the same transaction as the batch. `id_prefix` is a dialect's (`msgbatch`).
        With `max_queued`, a batch that would leave the tenant more items queued than
        that is refused (TooManyRequests) and nothing is written.
        """
        batch_id = new_id(id_prefix)
        events = None
        if webhook is not None:
            events = encode(webhook.events or list(models.BATCH_EVENTS)).decode()
        with self._tx() as cur:
            seq = self._all(
                "INSERT INTO batches (seq, id, tenant, kind, status, total, queued, created_at,"
                " metadata, max_attempts, item_timeout_s, concurrency, webhook_url,"
                " webhook_events, expires_at, dialect, dialect_data)"
                f" VALUES ({self._next_batch_seq}, ?,?,?, 'queued', 0, 0, ?,?,?,?,?,?,?,?,?,?)"
                " RETURNING seq",
                (batch_id, tenant, kind, now, encode(metadata or {}), max_attempts,
                 item_timeout_s, concurrency, webhook.url if webhook else None, events,
                 expires_at, dialect, None if dialect_data is None else encode(dialect_data)),
            )[0][0]
            if input_file_id is not None:
                total = self._items_from_file(cur, seq, kind, tenant, input_file_id, now)
            else:
                total = self._items_from_iterable(cur, seq, kind, items, now)
            if total == 0:
                raise InvalidInput("a batch needs at least one item",
                                   [{"field": "items", "message": "empty"}])
            cur.execute("UPDATE batches SET total=?, queued=? WHERE seq=?", (total, total, seq))
            if max_queued is not None:
                if total > max_queued:
                    raise InvalidInput(
                        f"a batch of {total} items is over the limit of {max_queued} queued"
                        " items per tenant (max_queued_items): split it",
                        [{"field": "items", "message": "more than max_queued_items"}])
                self._check_queued(tenant, total, max_queued)
            row = self._batch_row(seq)
            if idempotency is not None:
                self._idempotency_put(cur, tenant, idempotency, row, now)
        return row

    def _check_queued(self, tenant: str, new: int, limit: int) -> None:
        queued = self._one("SELECT coalesce(sum(queued), 0) FROM batches WHERE tenant=?"
                           " AND completed_at IS NULL", (tenant,))[0]
        if queued > limit:
            raise TooManyRequests(
                f"this batch of {new} items would leave {queued} queued; the limit is"
                f" {limit} per tenant (max_queued_items): submit when some have run",
                QUEUE_RETRY_AFTER_S)

    def batch_insert_refused(self, *, tenant: str, kind: str, now: float, metadata: dict | None,
                             dialect: str, dialect_data: dict,
                             idempotency: tuple[str, bytes, int, Any] | None = None
                             ) -> BatchRow:
        """A batch that ends `failed` as it is made, with no items (a dialect's file that
        did not validate), and its end's events, in one transaction."""
        with self._tx() as cur:
            seq = self._all(
                "INSERT INTO batches (seq, id, tenant, kind, status, total, queued, created_at,"
                " metadata, max_attempts, dialect, dialect_data)"
                f" VALUES ({self._next_batch_seq}, ?,?,?, 'queued', 0, 0, ?,?, 1, ?,?)"
                " RETURNING seq", (new_id("batch"), tenant, kind, now, encode(metadata or {}),
                                   dialect, encode(dialect_data)))[0][0]
            self._batch_finish_if_done(cur, seq, now)
            row = self._batch_row(seq)
            if idempotency is not None:
                self._idempotency_put(cur, tenant, idempotency, row, now)
        return row

    def _items_from_iterable(self, cur: apsw.Cursor, seq: int, kind: str,
                             items: Iterable[Any], now: float) -> int:
        seen: set[str] = set()
        index = 0
        rest = iter(items)
        while raws := list(itertools.islice(rest, CHUNK)):
            chunk: list[tuple] = []
            for item in items_in(raws, index):
                if item.entry_id is not None:
                    if item.entry_id in seen:
                        raise InvalidInput(
                            f"duplicate entry_id {item.entry_id!r} at item {index}",
                            [{"field": f"items[{index}].entry_id", "message": "duplicate"}])
                    seen.add(item.entry_id)
                try:
                    encoded = encode(item.input)
                    meta = None if item.metadata is None else encode(item.metadata)
                except (TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:
                    raise InvalidInput(  # ValueError: an int past 4,300 digits
                        f"item {index} is not JSON-encodable: {exc}",
                        [{"field": f"items[{index}].input", "message": str(exc)}]) from None
                if too_deep(encoded) or (meta is not None and too_deep(meta)):
                    raise InvalidInput(
                        f"item {index} nests deeper than {MAX_NESTING} levels",
                        [{"field": f"items[{index}]", "message": "nested too deeply"}])
                chunk.append((seq, index, kind, item.entry_id, encoded, meta, now))
                index += 1
            self._items_write(cur, chunk)
        return index

    @staticmethod
    def _items_write(cur: apsw.Cursor, rows: list[tuple]) -> None:
        cur.executemany(
            "INSERT INTO items (batch, idx, kind, entry_id, status, input, metadata, run_at)"
            " VALUES (?,?,?,?, 'queued', ?,?,?)", rows)

    def _items_from_file(self, cur: apsw.Cursor, seq: int, kind: str, tenant: str,
                         file_id: str, now: float) -> int:
        if self._one("SELECT 1 FROM files WHERE id=? AND tenant=? AND lines>=0",
                     (file_id, tenant)) is None:  # lines < 0: an upload not yet finished
            raise InvalidInput(f"no file {file_id!r}",
                               [{"field": "input_file_id", "message": "unknown file"}])
        cur.execute(
            "INSERT INTO items (batch, idx, kind, entry_id, status, input, metadata, run_at)"
            " SELECT ?, line - 1, ?, entry_id, 'queued', input, metadata, ?"
            " FROM file_lines WHERE file=? ORDER BY line", (seq, kind, now, file_id))
        return self.conn.changes()

    def _batch_row(self, seq: int) -> BatchRow:
        return BatchRow(*self._one(f"SELECT {BATCH_COLS} FROM batches WHERE seq=?", (seq,)))

    def _batch_row_by_id(self, batch_id: str, tenant: str | None) -> BatchRow:
        row = self._one(f"SELECT {BATCH_COLS} FROM batches WHERE id=?", (batch_id,))
        if row is None or (tenant is not None and row[2] != tenant):
            raise NotFound(f"no batch {batch_id!r}")
        return BatchRow(*row)

    def batch_row(self, batch_id: str, tenant: str | None) -> BatchRow:
        """The batch's row, for a dialect to render in its own shape (404 if not found)."""
        return self._batch_row_by_id(batch_id, tenant)

    def batch_rows(self, batch_ids: list[str], tenant: str) -> list[BatchRow]:
        """The rows of those of `batch_ids` that are the tenant's, in one read."""
        if not batch_ids:
            return []
        return [BatchRow(*r) for r in self._all(
            f"SELECT {BATCH_COLS} FROM batches WHERE tenant=? AND id IN"
            f" ({','.join('?' * len(batch_ids))})", (tenant, *batch_ids))]

    def batch_get(self, batch_id: str, tenant: str | None = None) -> Batch:
        """The batch with its delivery summary (the polling_url's answer)."""
        return self._batch_with_deliveries(self._batch_row_by_id(batch_id, tenant))

    def _batch_with_deliveries(self, row: BatchRow) -> Batch:
        batch = batch_struct(row)
        if row.webhook_url is None:  # no webhook, no deliveries: skip the two queries
            batch.deliveries, batch.failed_webhooks = DeliverySummary(), []
        else:
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
        rows = self._all(
            f"SELECT {BATCH_COLS} FROM batches WHERE {' AND '.join(where)}"
            " ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        batches = [self._batch_with_deliveries(BatchRow(*r)) for r in rows[:limit]]
        return batches, len(rows) > limit

    def batch_rows_list(self, tenant: str, *, dialect: str, after: str | None, limit: int,
                        before: str | None = None) -> tuple[list[BatchRow], bool]:
        """A dialect's batches of a tenant as rows, newest first: the page just older than
        the batch whose id is `after`, or just newer than `before`; and whether more
        follow in that direction."""
        def seq_of(batch_id: str, field: str) -> int:
            row = self._one("SELECT seq FROM batches WHERE id=? AND tenant=? AND dialect=?",
                            (batch_id, tenant, dialect))
            if row is None:
                raise InvalidInput(f"unknown cursor {batch_id!r}",
                                   [{"field": field, "message": "unknown cursor"}])
            return row[0]

        where = "tenant=? AND dialect=? AND seq"
        if before is not None:
            rows = self._all(f"SELECT {BATCH_COLS} FROM batches WHERE {where}>?"
                             " ORDER BY seq LIMIT ?",
                             (tenant, dialect, seq_of(before, "before_id"), limit + 1))
            return [BatchRow(*r) for r in rows[:limit]][::-1], len(rows) > limit
        start = 2**62 if after is None else seq_of(after, "after_id")
        rows = self._all(f"SELECT {BATCH_COLS} FROM batches WHERE {where}<?"
                         " ORDER BY seq DESC LIMIT ?", (tenant, dialect, start, limit + 1))
        return [BatchRow(*r) for r in rows[:limit]], len(rows) > limit

    def batch_cancel(self, batch_id: str, tenant: str | None, now: float) -> tuple[Batch, int]:
        """Cancel queued items now; running ones end as their workers stop.

        Returns the batch and its seq (the runner interrupts that batch's running items).
        """
        with self._tx() as cur:
            row = self._batch_row_by_id(batch_id, tenant)
            if row.status in models.BATCH_TERMINAL:
                raise Conflict(f"batch {batch_id} is already {row.status}")
            if row.status != "cancelling":
                cur.execute("UPDATE batches SET status='cancelling', cancel_requested_at=?"
                            " WHERE seq=?", (now, row.seq))
                self._cancel_queued(cur, row.seq, now)
        return self.batch_get(batch_id, tenant), row.seq

    def _cancel_queued(self, cur: apsw.Cursor, batch_seq: int, now: float) -> None:
        cur.execute("UPDATE items SET status='cancelled' WHERE batch=? AND status='queued'",
                    (batch_seq,))
        n = self.conn.changes()
        cur.execute("UPDATE batches SET queued=queued-?, cancelled=cancelled+? WHERE seq=?",
                    (n, n, batch_seq))
        self._batch_finish_if_done(cur, batch_seq, now)

    def batches_expire(self, now: float) -> list[int]:
        """Batches whose `expires_at` has passed: their items not started end `expired`;
        the batch ends `expired` once its running items finish. Returns their seqs."""
        with self._tx() as cur:
            seqs = [r[0] for r in self._all(
                "SELECT seq FROM batches WHERE completed_at IS NULL AND expires_at<=?"
                " AND expiring=0 AND status<>'cancelling'", (now,))]
            for seq in seqs:
                cur.execute("UPDATE batches SET expiring=1 WHERE seq=?", (seq,))
                self._expire_queued(cur, seq, now)
        return seqs

    def _expire_queued(self, cur: apsw.Cursor, batch_seq: int, now: float) -> None:
        cur.execute("UPDATE items SET status='expired' WHERE batch=? AND status='queued'",
                    (batch_seq,))
        n = self.conn.changes()
        cur.execute("UPDATE batches SET queued=queued-?, expired=expired+? WHERE seq=?",
                    (n, n, batch_seq))
        self._batch_finish_if_done(cur, batch_seq, now)

    def batches_fail_unknown_kinds(self, kinds: Iterable[str], now: float) -> list[str]:
        """Fail the queued items of open batches whose kind has no handler here, nor in
        any process whose lease on that kind is live (processes sharing a database may
        serve different kinds)."""
        known = list(kinds)
        unknown = f" AND kind NOT IN ({','.join('?' * len(known))})" if known else ""
        with self._tx() as cur:
            cur.execute("DELETE FROM kind_leases WHERE lease_until <= ?", (now,))
            rows: list[Any] = cur.execute(
                f"SELECT seq, id, kind FROM batches WHERE completed_at IS NULL{unknown}"
                " AND kind NOT IN (SELECT kind FROM kind_leases)", known).fetchall()
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
        elif row.expiring:
            status = "expired"
        else:
            status = "completed" if row.succeeded else "failed"
        cur.execute("UPDATE batches SET status=?, completed_at=? WHERE seq=?", (status, now, seq))
        ended = self._batch_row(seq)
        if ended.dialect == "openai":
            self._output_files_insert(cur, ended, now)
        event = ended.event_type()
        payload = None
        if row.webhook_url and not row.webhook_gone and event in row.events():
            payload = event_payload(ended, event, now)
            self._delivery_insert(cur, row, event, payload, now)
        for endpoint_id, url in self._endpoints_for(ended.tenant, event):
            # one event, one frozen body, wherever it goes
            payload = payload or event_payload(ended, event, now)
            self._delivery_insert(cur, row, event, payload, now, url=url, endpoint=endpoint_id)

    def batch_seq(self, batch_id: str, tenant: str | None) -> int:
        return self._batch_row_by_id(batch_id, tenant).seq

    def batches_cancelling(self, seqs: Iterable[int]) -> list[int]:
        seqs = list(seqs)
        if not seqs:
            return []
        return [r[0] for r in self.conn.execute(
            f"SELECT seq FROM batches WHERE status IN ('cancelling','cancelled')"
            f" AND seq IN ({','.join('?' * len(seqs))})", seqs)]
