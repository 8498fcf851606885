"""What only the dashboard reads (errors grouped, a batch's throughput, an endpoint's
health) and its sessions. Each read is bounded by what it shows, not by the batch's size:
a page of a batch of a million items reads what it would for a batch of ten."""

from __future__ import annotations

from typing import Any

from .base import StoreBase

ERRORS_SCANNED = 2000  # failed items read to group their errors (about 2 ms)
HEALTH_WINDOW = 100  # an endpoint's most recent deliveries that its health is taken from


class ViewQueries(StoreBase):
    def items_error_groups(self, batch_seq: int, limit: int) -> list[tuple[str, str, int]]:
        """(code, message, count) of the batch's failed items, most frequent first, taken
        from its first ERRORS_SCANNED failures."""
        return self._all(
            "SELECT json_extract(e, '$.code'), json_extract(e, '$.message'), count(*) FROM"
            " (SELECT CAST(error AS TEXT) AS e FROM items WHERE batch=? AND status='failed'"
            "  ORDER BY idx LIMIT ?) GROUP BY 1, 2 ORDER BY 3 DESC, 2 LIMIT ?",
            (batch_seq, ERRORS_SCANNED, limit))

    def batch_throughput(self, batch_seq: int, buckets: int) -> tuple[int, int, list[int]]:
        """Items the batch ended per bucket of its life so far: (first second, seconds
        per bucket, counts), at most `buckets` of them; (0, 1, []) before any ended."""
        first, last = self._one("SELECT min(second), max(second) FROM batch_ticks"
                                " WHERE batch=?", (batch_seq,))
        if first is None:
            return 0, 1, []
        width = max(1, -(-(last - first + 1) // buckets))
        counts = [0] * (-(-(last - first + 1) // width))
        for bucket, n in self.conn.execute(
                "SELECT (second - ?) / ?, sum(n) FROM batch_ticks WHERE batch=? GROUP BY 1",
                (first, width, batch_seq)):
            counts[bucket] = n
        return first, width, counts

    def endpoint_health(self, endpoint_id: str) -> dict[str, Any]:
        """An endpoint's recent deliveries: how many ended, how many of those succeeded,
        the last error and when the next attempt is due."""
        rows = self._all(
            "SELECT status, last_status_code, last_error, last_attempt_at FROM deliveries"
            " WHERE endpoint=? ORDER BY seq DESC LIMIT ?", (endpoint_id, HEALTH_WINDOW))
        ended = [r for r in rows if r[0] in ("succeeded", "failed")]
        error = next((r for r in rows if r[2] is not None), None)
        due = self._one("SELECT min(next_attempt_at) FROM deliveries WHERE endpoint=?"
                        " AND status IN ('pending', 'sending')", (endpoint_id,))[0]
        return {"recent": len(rows), "ended": len(ended),
                "succeeded": sum(r[0] == "succeeded" for r in ended),
                "last_error": None if error is None else error[2],
                "last_error_status": None if error is None else error[1],
                "last_error_at": None if error is None else error[3],
                "next_attempt_at": due}

    # -- sessions ----------

    def session_create(self, token_hash: bytes, key_hash: bytes, csrf: str, now: float,
                       expires_at: float) -> None:
        """A signed-in session (and the expired ones gone)."""
        with self._tx() as cur:
            cur.execute("DELETE FROM ui_sessions WHERE expires_at<=?", (now,))
            cur.execute("INSERT INTO ui_sessions VALUES (?,?,?,?,?)",
                        (token_hash, key_hash, csrf, now, expires_at))

    def session_get(self, token_hash: bytes, now: float) -> tuple[bytes, str] | None:
        """(key digest, form token) of a session that has not expired, or None."""
        row = self._one("SELECT key_hash, csrf FROM ui_sessions WHERE token_hash=? AND"
                        " expires_at>?", (token_hash, now))
        return None if row is None else (row[0], row[1])

    def session_delete(self, token_hash: bytes) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM ui_sessions WHERE token_hash=?", (token_hash,))
