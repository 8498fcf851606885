"""Webhook deliveries: insert with the event, claim when due, record attempts, redeliver,
and the summary a batch shows."""

from __future__ import annotations

import apsw

from ..errors import Conflict, InvalidInput, NotFound
from ..models import Attempt, Delivery, DeliverySummary, FailedWebhook, to_datetime
from .base import StoreBase
from .rows import (
    BatchRow,
    new_id,
    sanitize_url,
)

# The newest failed deliveries a batch object lists; all are counted in its summary and
# paged in GET …/deliveries, so the batch object stays small however many item events fail.
FAILED_WEBHOOKS_SHOWN = 20

# 'sending' (an attempt in flight) is internal: the API shows such a delivery as pending.
PUBLIC_STATUS = "CASE status WHEN 'sending' THEN 'pending' ELSE status END"


class DeliveryQueries(StoreBase):
    def _delivery_insert(self, cur: apsw.Cursor, row: BatchRow, event: str, payload: bytes,
                         now: float, *, url: str | None = None,
                         endpoint: str | None = None) -> None:
        """A delivery of `payload` to the batch's own webhook, or to `url`, a tenant's
        webhook `endpoint`."""
        cur.execute(
            "INSERT INTO deliveries (id, batch, tenant, event, url, payload, status,"
            " max_attempts, next_attempt_at, created_at, endpoint)"
            " VALUES (?,?,?,?,?,?, 'pending', ?,?,?,?)",
            (new_id("msg"), row.seq, row.tenant, event, url or row.webhook_url, payload,
             self.webhook_attempts, now + self.webhook_first_delay, now, endpoint))

    def deliveries_claim(self, now: float, limit: int, lease_s: float) -> list[tuple]:
        """Due deliveries, marked 'sending' and leased by pushing `next_attempt_at` past
        the attempt's timeout: a process that dies mid-attempt leaves the delivery due
        again once that passes.

        Nothing due is found by a read first: the deliverer looks ten times a second,
        and an empty write transaction would queue for the write lock behind every
        worker process's commits, holding the API's event loop meanwhile."""
        if self._one("SELECT 1 FROM deliveries WHERE status IN ('pending', 'sending')"
                     " AND next_attempt_at<=? LIMIT 1", (now,)) is None:
            return []
        with self._tx() as cur:
            return cur.execute(
                "UPDATE deliveries SET status='sending', next_attempt_at=? WHERE seq IN"
                " (SELECT seq FROM deliveries WHERE status IN ('pending', 'sending')"
                " AND next_attempt_at<=? ORDER BY next_attempt_at LIMIT ?)"
                " RETURNING seq, id, tenant, url, payload, attempt_count, max_attempts, batch,"
                " is_automatic, endpoint", (now + lease_s, now, limit)).fetchall()

    def deliveries_record(self, records: list) -> None:
        """Record attempts (delivery.AttemptRecord) and what follows each: done, failed,
        or the time of the next attempt. One transaction for the group.

        Only a delivery still 'sending' takes the record: one ended meanwhile (a sibling's
        410) keeps its end."""
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
            # is_automatic: after a manual attempt, the attempts still scheduled are automatic
            taken = {seq for (seq,) in cur.executemany(
                "UPDATE deliveries SET status=?1, attempt_count=?2, signing_secret_id=?3,"
                " next_attempt_at=?4, failure_reason_code=?5, failure_detail=?6,"
                " last_status_code=?7, last_error=?8, last_attempt_at=?9, completed_at=?10,"
                " is_automatic=CASE WHEN ?1='pending' THEN 1 ELSE is_automatic END"
                " WHERE seq=?11 AND status='sending' RETURNING seq", updates)}
            cur.executemany("INSERT INTO attempts VALUES (?,?,?,?,?,?,?,?)",
                            [(r.seq, r.attempt_number, r.status_code, r.response_body,
                              r.response_time_ms, r.error, r.is_automatic, r.now)
                             for r in records if r.seq in taken])
            for r in records:
                if r.gone and r.seq in taken:
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
        """Manual redelivery: the same frozen bytes and webhook-id, sent again now.

        A pending delivery keeps its remaining automatic attempts (the manual one comes
        first); an ended one gets one more attempt; one being sent is a 409."""
        with self._tx() as cur:
            row = self._one("SELECT seq, tenant, status FROM deliveries WHERE id=? AND batch IN"
                            " (SELECT seq FROM batches)", (delivery_id,))  # not deleted
            if row is None or (tenant is not None and row[1] != tenant):
                raise NotFound(f"no delivery {delivery_id!r}")
            seq, _, status = row
            if status == "sending":
                raise Conflict("an attempt of this delivery is in flight; retry once it ends")
            if status == "pending":
                cur.execute("UPDATE deliveries SET is_automatic=0, next_attempt_at=?"
                            " WHERE seq=?", (now, seq))
            else:
                cur.execute(
                    "UPDATE deliveries SET status='pending', is_automatic=0, next_attempt_at=?,"
                    " max_attempts=attempt_count+1, completed_at=NULL,"
                    " failure_reason_code=NULL, failure_detail=NULL WHERE seq=?", (now, seq))
        return self.delivery_by_seq(seq)

    def deliveries_page(self, batch_seq: int, *, limit: int, after: str | None
                        ) -> tuple[list[Delivery], bool]:
        """Up to `limit` deliveries of a batch, oldest first, after the delivery whose id
        is `after` (a cursor from the previous page); and whether more follow."""
        start = 0
        if after is not None:
            row = self._one("SELECT seq FROM deliveries WHERE id=? AND batch=?",
                            (after, batch_seq))
            if row is None:
                raise InvalidInput(f"unknown cursor {after!r}",
                                   [{"field": "after", "message": "unknown cursor"}])
            start = row[0]
        rows = self._deliveries_where("d.batch=? AND d.seq>?", (batch_seq, start), limit + 1)
        return rows[:limit], len(rows) > limit

    def delivery_by_seq(self, seq: int) -> Delivery:
        return self._deliveries_where("d.seq=?", (seq,), 1)[0]

    def _deliveries_where(self, where: str, args: tuple, limit: int) -> list[Delivery]:
        """Deliveries matching `where`, by seq, each with its attempts."""
        rows = self._all(
            "SELECT d.seq, d.id, b.id, event, url, payload,"
            " CASE d.status WHEN 'sending' THEN 'pending' ELSE d.status END, is_automatic,"
            " signing_secret_id, attempt_count, d.max_attempts, next_attempt_at,"
            " failure_reason_code, failure_detail, d.created_at, d.completed_at, d.endpoint"
            f" FROM deliveries d JOIN batches b ON b.seq=d.batch WHERE {where}"
            " ORDER BY d.seq LIMIT ?", (*args, limit))
        # All their attempts in one query, not one query per delivery.
        attempts_of: dict[int, list[Attempt]] = {r[0]: [] for r in rows}
        if rows:
            for a in self._all(
                    "SELECT delivery, attempt_number, status_code, response_body,"
                    " response_time_ms, error_message, is_automatic, created_at FROM attempts"
                    f" WHERE delivery IN ({','.join('?' * len(rows))}) ORDER BY rowid",
                    list(attempts_of)):
                attempts_of[a[0]].append(Attempt(
                    attempt_number=a[1], status_code=a[2], response_body=a[3],
                    response_time_ms=a[4], error_message=a[5], is_automatic=bool(a[6]),
                    created_at=to_datetime(a[7])))
        return [Delivery(
            id=r[1], batch_id=r[2], event=r[3], url=sanitize_url(r[4]),
            payload_bytes=r[5].decode(),
            status=r[6], is_automatic=bool(r[7]), signing_secret_id=r[8],
            attempt_count=r[9], max_attempts=r[10],
            next_attempt_at=to_datetime(r[11]) if r[6] == "pending" else None,
            failure_reason_code=r[12], failure_detail=r[13],
            created_at=to_datetime(r[14]), completed_at=to_datetime(r[15]),
            endpoint_id=r[16], attempts=attempts_of[r[0]]) for r in rows]

    def deliveries_pending_count(self) -> int:
        return self._one("SELECT count(*) FROM deliveries"
                         " WHERE status IN ('pending', 'sending')")[0]

    def _delivery_summary(self, batch_seq: int) -> tuple[DeliverySummary, list[FailedWebhook]]:
        summary = DeliverySummary()
        for status, n in self.conn.execute(
                f"SELECT {PUBLIC_STATUS} AS s, count(*) FROM deliveries WHERE batch=?"
                " GROUP BY s",
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
                      " WHERE batch=? AND status='failed' ORDER BY seq DESC LIMIT ?",
                      (batch_seq, FAILED_WEBHOOKS_SHOWN))]
        return summary, failed[::-1]
