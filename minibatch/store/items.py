"""Items: claim under a lease, extend, finish, rescue, release; pages and results."""

from __future__ import annotations

import contextlib
import secrets as pysecrets
from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

import apsw

from ..errors import InvalidInput
from ..models import Event, Item, ItemRecord, to_datetime
from .base import StoreBase
from .rows import (
    UNREADABLE,
    BatchRow,
    Claimed,
    Outcome,
    decode,
    encode,
    error_bytes,
    item_id,
    item_record_of,
)

# The index a page of items of one status reads: the status's own partial index where it
# has one, else the batch's items in order (`queued` and `succeeded` are most of a batch
# while it runs and once it has run; `running` items are few, whichever batch).
STATUS_INDEX = {"queued": "items_batch_idx", "running": "items_running",
                "succeeded": "items_batch_idx", "failed": "items_failed",
                "cancelled": "items_cancelled", "expired": "items_expired"}


# An outcome's write, guarded by its claim's lease.
FINISH = ("UPDATE items SET status=?, output=?, error=?, run_at=?, lease_until=NULL"
          " WHERE seq=? AND status='running' AND lease_owner=? AND lease_token=?")


class _LeaseLost(Exception):
    """An outcome of the write under way lost its lease: the write starts again."""


class DueBatch(NamedTuple):
    """What a claim reads of a batch it may serve: its share, and what its items carry.
    Fewer columns than a BatchRow, since this is read on every claim (28 -> 19 us)."""

    seq: int
    id: str
    running: int
    concurrency: int | None
    max_attempts: int
    item_timeout_s: float | None
    expires_at: float | None


class ItemQueries(StoreBase):
    def items_claim(self, kind: str, limit: int, owner: str, now: float,
                    lease_s: float) -> list[Claimed]:
        """Claim up to `limit` due items of `kind`, each with a lease of `lease_s`.

        The claim is shared round-robin between the open batches of the kind that have
        due items, the least recently served first, so one small batch is not stuck behind
        a big one. A batch's own `concurrency` caps its running items: candidates beyond a
        batch's free slots are left queued. An item whose stored input or metadata cannot
        be decoded is not handed out: it ends `failed` (`bad_input`) in the same transaction.
        """
        with self._tx(scope=f"claim:{kind}") as cur:
            batches = self._batches_due(cur, kind, now, limit)
            if not batches:
                return []
            shares = self._shares(cur, batches, limit, now)
            # Owner and attempt number alone do not name a claim: a handed-back item is
            # claimed again with the same attempt number, maybe by the same owner.
            token = pysecrets.randbits(62)
            rows = [row for picked in shares.values() for row in picked]
            # No RETURNING: the rows were read in this transaction (and on PostgreSQL
            # locked), so each is still queued; a RETURNING cost ~0.4 us an item here.
            cur.execute(
                "UPDATE items SET status='running', attempts=attempts+1, lease_until=?,"
                f" lease_owner=?, lease_token=? WHERE seq IN ({','.join('?' * len(rows))})"
                " AND status='queued'", (now + lease_s, owner, token, *(r[0] for r in rows)))
            if self.conn.changes() != len(rows):  # undo, rather than hand out an item twice
                raise RuntimeError(f"claimed {self.conn.changes()} of {len(rows)} items read"
                                   " as queued in the same transaction")
            self._batches_claimed(cur, kind, list(shares),
                                  {b: len(picked) for b, picked in shares.items()}, now)
            claimed, unreadable = _claims_of(rows, batches, now, token)
            if unreadable:
                self._fail_unreadable(cur, unreadable, now)
        return claimed

    def _batches_due(self, cur: apsw.Cursor, kind: str, now: float,
                     limit: int) -> list[DueBatch]:
        """The open batches of `kind` with due items and a free slot, in the order they are
        served: least recently served first (`claim_turn`; never served, NULL, first). At
        most `limit` of them, since each one served takes an item at least."""
        return [DueBatch(*r) for r in cur.execute(
            "SELECT seq, id, running, concurrency, max_attempts, item_timeout_s, expires_at"
            " FROM batches WHERE kind=? AND completed_at IS NULL"
            " AND (concurrency IS NULL OR running < concurrency)"
            " AND EXISTS (SELECT 1 FROM items WHERE batch=batches.seq AND status='queued'"
            " AND run_at<=?) ORDER BY claim_turn NULLS FIRST, seq LIMIT ?",
            (kind, now, limit))]

    def _shares(self, cur: apsw.Cursor, batches: list[DueBatch], limit: int,
                now: float) -> dict[int, list[tuple]]:
        """Up to `limit` due items, oldest first within a batch, shared between `batches`
        in their order: batch seq -> the rows of its items (seq, batch, idx, entry_id,
        input, metadata, attempts), for the batches served.

        Each round offers every batch still in play an equal share of what is left; a
        batch with fewer due items or free slots than its share leaves the round, and what
        it did not take goes to the others in the next. Each round fills the claim or
        drops a batch, so there are at most len(batches) + 1. With more batches than
        `limit`, only the first `limit` get an item, one each.
        """
        room = {b.seq: limit if b.concurrency is None else b.concurrency - b.running
                for b in batches}
        taken: dict[int, list[tuple]] = {b.seq: [] for b in batches}
        left, in_play = limit, list(taken)
        while left and in_play:
            share = max(1, left // len(in_play))
            next_round = []
            for b in in_play:
                if not left:
                    break
                want = min(share, room[b] - len(taken[b]), left)
                got = cur.execute(
                    "SELECT seq, batch, idx, entry_id, input, metadata, attempts FROM items"
                    " WHERE batch=? AND status='queued' AND run_at<=?"
                    f" ORDER BY run_at, seq LIMIT ? OFFSET ?{self._skip_locked}",
                    (b, now, want, len(taken[b]))).fetchall()
                taken[b] += got
                left -= len(got)
                if len(got) == want and len(taken[b]) < room[b]:
                    next_round.append(b)
            in_play = next_round
        return {b: picked for b, picked in taken.items() if picked}

    def _batches_claimed(self, cur: apsw.Cursor, kind: str, served: list[int],
                         claimed: dict[int, int], now: float) -> None:
        """Move the claimed items from queued to running in their batches' counters, and
        give each batch served its turn: after every open batch of the kind, in the order
        they were served, so the next claim starts with the batches this one left out.
        Rows are written in seq order, the order every transaction locks batches in."""
        last = self._one("SELECT coalesce(max(claim_turn), 0) FROM batches"
                         " WHERE kind=? AND completed_at IS NULL", (kind,))[0]
        turns = {b: last + turn for turn, b in enumerate(served, start=1)}
        cur.executemany(
            "UPDATE batches SET queued=queued-?1, running=running+?1,"
            " status=CASE status WHEN 'queued' THEN 'running' ELSE status END,"
            " started_at=coalesce(started_at, ?2), claim_turn=?3 WHERE seq=?4",
            [(claimed[b], now, turns[b], b) for b in sorted(served)])

    def _fail_unreadable(self, cur: apsw.Cursor, unreadable: list[tuple[int, int, str]],
                         now: float) -> None:
        """End claimed items whose stored input or metadata cannot be decoded: `failed`
        with `bad_input`, at once, since no attempt could read them either."""
        deltas: dict[int, Counter] = {}
        for b, seq, message in unreadable:
            error = error_bytes("bad_input", message)
            cur.execute("UPDATE items SET status='failed', error=?, lease_until=NULL"
                        " WHERE seq=?", (error, seq))
            deltas.setdefault(b, Counter())["failed"] += 1
        # item events go before the batch's own terminal event
        self._item_events(cur, [(b, seq) for b, seq, _ in unreadable], now)
        self._apply_deltas(cur, deltas, now)

    def leases_extend(self, owner: str, until: float, kinds: Iterable[str] = ()) -> int:
        """Extend an owner's leases on its running items and on the kinds it serves."""
        with self._tx() as cur:
            cur.execute("UPDATE items SET lease_until=? WHERE status='running' AND lease_owner=?",
                        (until, owner))
            extended = self.conn.changes()
            cur.executemany("INSERT INTO kind_leases (kind, owner, lease_until)"
                            " VALUES (?, ?, ?) ON CONFLICT (kind, owner)"
                            " DO UPDATE SET lease_until=excluded.lease_until",
                            [(kind, owner, until) for kind in kinds])
            return extended

    def leases_expire(self, owner: str) -> int:
        """Mark a dead owner's leases expired, so the rescuer takes them now; it serves
        no kind any more."""
        with self._tx() as cur:
            cur.execute("DELETE FROM kind_leases WHERE owner=?", (owner,))
            cur.execute("UPDATE items SET lease_until=0 WHERE status='running' AND lease_owner=?",
                        (owner,))
            return self.conn.changes()

    def items_release(self, owner: str, now: float) -> int:
        """Hand an owner's running items back to the queue; the attempt is not counted.
        The owner serves no kind from now on."""
        with self._tx() as cur:
            cur.execute("DELETE FROM kind_leases WHERE owner=?", (owner,))
            rows: list[Any] = cur.execute(
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
        Nearly always every lease still holds, and the counters come from the outcomes
        themselves: a RETURNING row per outcome cost ~1.6 us of the ~3.4 us an outcome's
        write took (measured here). When one was lost, the transaction is undone and
        written again, counting the rows that applied.
        """
        rows = [(o.status, o.output, o.error, o.run_at, o.seq, owner, o.token)
                for o in outcomes]
        with contextlib.suppress(_LeaseLost), self._tx() as cur:
            if self._update_many(cur, FINISH, rows) != len(rows):
                raise _LeaseLost  # undoes this transaction
            self._outcomes_written(cur, [(o.batch_seq, o.seq, o.status) for o in outcomes],
                                   now)
            return len(rows)
        with self._tx() as cur:
            written: list[Any] = cur.executemany(
                FINISH + " RETURNING batch, seq, status", rows).fetchall()
            self._outcomes_written(cur, written, now)
        return len(written)

    def _outcomes_written(self, cur: apsw.Cursor, written: list[tuple[int, int, str]],
                          now: float) -> None:
        """The counters, events and batch ends that follow outcomes written, each given as
        (batch seq, item seq, status)."""
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

    @staticmethod
    def _count_ticks(cur: apsw.Cursor, deltas: dict[int, Counter], second: int) -> None:
        """Add the items each batch ended in this second to its throughput picture."""
        cur.executemany(
            "INSERT INTO batch_ticks VALUES (?,?,?)"
            " ON CONFLICT (batch, second) DO UPDATE SET n = batch_ticks.n + excluded.n",
            [(b, second, d["succeeded"] + d["failed"]) for b, d in deltas.items()
             if d["succeeded"] or d["failed"]])

    def _apply_deltas(self, cur: apsw.Cursor, deltas: dict[int, Counter], now: float) -> None:
        """Move finished items from running into their new counters, then settle batches."""
        self._count_ticks(cur, deltas, int(now))
        for b, d in sorted(deltas.items()):  # batches locked in seq order, as claims do
            cur.execute(
                "UPDATE batches SET running=running-?, queued=queued+?, succeeded=succeeded+?,"
                " failed=failed+?, cancelled=cancelled+?, expired=expired+? WHERE seq=?",
                (sum(d.values()), d["queued"], d["succeeded"], d["failed"], d["cancelled"],
                 d["expired"], b))
            if d["expired"]:  # the runner saw the batch's expiry first: it is expiring
                cur.execute("UPDATE batches SET expiring=1 WHERE seq=? AND status<>'cancelling'",
                            (b,))
            status, expiring = (self._one("SELECT status, expiring FROM batches WHERE seq=?",
                                          (b,)) if d["queued"] or d["expired"] else (None, 0))
            if status == "cancelling":
                self._cancel_queued(cur, b, now)  # a retry in a cancelled batch ends here
            elif expiring:
                self._expire_queued(cur, b, now)  # and one in an expired batch here
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

    def items_rescue(self, now: float, *, except_owner: str | None = None) -> int:
        """Put items whose lease expired back in the queue, counting the attempt.

        `except_owner`: an owner whose leases are never taken, expired or not: the
        calling process itself, which knows its items are still running.
        """
        spared, args = ("", (now,)) if except_owner is None else (
            " AND i.lease_owner IS NOT ?", (now, except_owner))
        with self._tx() as cur:
            rows: list[Any] = cur.execute(
                "SELECT i.seq, i.batch, i.attempts, b.max_attempts FROM items i"
                " JOIN batches b ON b.seq = i.batch"
                f" WHERE i.status='running' AND i.lease_until < ?{spared}", args).fetchall()
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
                        " metadata, run_at FROM items WHERE seq=?", (seq,))
        return item_record_of(row, batch_id)

    def items_page(self, batch_id: str, tenant: str | None, *, status: str | None,
                   limit: int, after: int) -> tuple[list[ItemRecord], bool]:
        """Items in submission order after index `after` (exclusive; -1 for the start)."""
        row = self._batch_row_by_id(batch_id, tenant)
        if not -1 <= after < row.total:
            raise InvalidInput(f"unknown cursor {after!r}",
                               [{"field": "after", "message": "unknown cursor"}])
        where = " WHERE"
        if status is not None:
            if status not in STATUS_INDEX:
                raise InvalidInput(f"unknown status {status!r}",
                                   [{"field": "status", "message": "unknown status"}])
            if not getattr(row, status):
                return [], False  # the batch's counters say none has it
            # The status is a literal (one of STATUS_INDEX's keys), so the partial index
            # applies: a page of 50 failures among a million successes reads 51 rows.
            where = f" INDEXED BY {STATUS_INDEX[status]} WHERE status='{status}' AND"
        rows = self.conn.execute(
            "SELECT seq, idx, entry_id, status, input, output, error, attempts, metadata,"
            f" run_at FROM items{where} batch=? AND idx>? ORDER BY idx LIMIT ?",
            (row.seq, after, limit + 1)).fetchall()
        return [item_record_of(r, row.id) for r in rows[:limit]], len(rows) > limit

    def results_page(self, batch_seq: int, after: int, limit: int) -> list[tuple]:
        """Raw result rows (idx, seq, entry_id, status, output, error, attempts) after `after`."""
        return self.conn.execute(
            "SELECT idx, seq, entry_id, status, output, error, attempts FROM items"
            " WHERE batch=? AND idx>? AND status IN ('succeeded','failed','cancelled','expired')"
            " ORDER BY idx LIMIT ?", (batch_seq, after, limit)).fetchall()


def _claims_of(rows: list[tuple], batches: list[DueBatch], now: float,
               token: int) -> tuple[list[Claimed], list[tuple[int, int, str]]]:
    """The claimed rows (as read before the claim: `attempts` is one more now) as
    Claimed, and (batch seq, item seq, why) for those whose input or metadata cannot be
    decoded.

    In the order the batches were served: a claim is never larger than the kind's free
    slots and one claim's worth waiting, so every item claimed starts soon, whatever its
    place in the list.
    """
    batch_of = {b.seq: b for b in batches}
    claimed, unreadable = [], []
    for seq, b, idx, entry_id, inp, meta, tried in rows:
        attempts = tried + 1
        batch = batch_of[b]
        try:  # inline, not a function per item: this loop is on every item's path
            item = Item(id=item_id(seq), batch_id=batch.id, entry_id=entry_id, index=idx,
                        input=decode(inp), metadata=None if meta is None else decode(meta),
                        attempt=attempts)
        except UNREADABLE:
            unreadable.append((b, seq, _why_unreadable(inp, meta)))
            continue
        claimed.append(Claimed(item, seq, b, batch.max_attempts, batch.item_timeout_s, now,
                               token, batch.expires_at))
    return claimed, unreadable


def _why_unreadable(inp: bytes, meta: bytes | None) -> str:
    """Which stored field of an item cannot be decoded, and msgspec's reason."""
    for field, raw in (("input", inp), ("metadata", meta)):
        try:
            if raw is not None:
                decode(raw)
        except UNREADABLE as exc:
            return (f"the stored {field} of this item cannot be decoded"
                    f" ({type(exc).__name__}: {exc})")
    return "the stored input or metadata of this item cannot be decoded"
