"""Items: claim under a lease, extend, finish, rescue, release; pages and results."""

from __future__ import annotations

import secrets as pysecrets
from collections import Counter
from typing import Any

import apsw

from ..errors import InvalidInput
from ..models import Event, Item, ItemRecord, to_datetime
from .base import StoreBase
from .rows import (
    BatchRow,
    Claimed,
    Outcome,
    decode,
    encode,
    error_bytes,
    item_id,
    item_record_of,
)


class ItemQueries(StoreBase):
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
            # Owner and attempt number alone do not name a claim: a handed-back item is
            # claimed again with the same attempt number, maybe by the same owner.
            token = pysecrets.randbits(62)
            rows = cur.execute(
                "UPDATE items SET status='running', attempts=attempts+1, lease_until=?,"
                f" lease_owner=?, lease_token=? WHERE seq IN ({','.join('?' * len(chosen))})"
                " RETURNING seq, batch, idx, entry_id, input, metadata, attempts",
                (now + lease_s, owner, token, *chosen)).fetchall()
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
                        input=decode(inp), metadata=None if meta is None else decode(meta),
                        attempt=attempts)
            claimed.append(Claimed(item, seq, b, batch.max_attempts, batch.item_timeout_s, now,
                                   token))
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

        Each write is guarded by the lease (`lease_owner` and the claim's token): an
        outcome whose lease was lost is discarded, so an item has exactly one outcome.
        """
        with self._tx() as cur:
            written = cur.executemany(
                "UPDATE items SET status=?, output=?, error=?, run_at=?, lease_until=NULL"
                " WHERE seq=? AND status='running' AND lease_owner=? AND lease_token=?"
                " RETURNING batch, seq, status",
                [(o.status, o.output, o.error, o.run_at, o.seq, owner, o.token)
                 for o in outcomes]).fetchall()
            deltas: dict[int, Counter] = {}
            for b, _, status in written:
                if b not in deltas:
                    deltas[b] = Counter()
                deltas[b][status] += 1
            finished = [(b, seq) for b, seq, status in written
                        if status in ("succeeded", "failed")]
            if finished:  # item events go before the batch's own terminal event
                self._item_events(cur, finished, now)
            self._apply_deltas(cur, deltas, now)
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
                    cur, row, event, encode(Event(event, to_datetime(now), record)), now)

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
            failed = []
            for seq, b, attempts, max_attempts in rows:
                status = "failed" if attempts >= max_attempts else "queued"
                cur.execute(
                    "UPDATE items SET status=?, error=?, run_at=?, lease_until=NULL WHERE seq=?",
                    (status, lost, now, seq))
                deltas.setdefault(b, Counter())[status] += 1
                if status == "failed":
                    failed.append((b, seq))
            if failed:  # item events go before the batch's own terminal event
                self._item_events(cur, failed, now)
            self._apply_deltas(cur, deltas, now)
        return len(rows)

    def item_record(self, seq: int, batch_id: str) -> ItemRecord:
        row = self._one("SELECT seq, idx, entry_id, status, input, output, error, attempts,"
                        " metadata FROM items WHERE seq=?", (seq,))
        return item_record_of(row, batch_id)

    def items_page(self, batch_id: str, tenant: str | None, *, status: str | None,
                   limit: int, after: int) -> tuple[list[ItemRecord], bool]:
        """Items in submission order after index `after` (exclusive; -1 for the start)."""
        row = self._batch_row_by_id(batch_id, tenant)
        if not -1 <= after < row.total:
            raise InvalidInput(f"unknown cursor {after!r}",
                               [{"field": "after", "message": "unknown cursor"}])
        sql = ("SELECT seq, idx, entry_id, status, input, output, error, attempts, metadata"
               " FROM items WHERE batch=? AND idx>?")
        args: list[Any] = [row.seq, after]
        if status is not None:
            sql += " AND status=?"
            args.append(status)
        rows = self.conn.execute(sql + " ORDER BY idx LIMIT ?", (*args, limit + 1)).fetchall()
        return [item_record_of(r, row.id) for r in rows[:limit]], len(rows) > limit

    def results_page(self, batch_seq: int, after: int, limit: int) -> list[tuple]:
        """Raw result rows (idx, seq, entry_id, status, output, error, attempts) after `after`."""
        return self.conn.execute(
            "SELECT idx, seq, entry_id, status, output, error, attempts FROM items"
            " WHERE batch=? AND idx>? AND status IN ('succeeded','failed','cancelled')"
            " ORDER BY idx LIMIT ?", (batch_seq, after, limit)).fetchall()
