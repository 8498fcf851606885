"""Deleting ended batches: at once for the caller, in small transactions for the file.

Deleting a batch removes its row (and its generated files) in one short transaction and
records it in `doomed`; from then on nothing shows it. Its items, deliveries and attempts
go afterwards, `chunk` rows per transaction (`doomed_prune`), so a batch of a million
items never holds the write lock for long, and a crash in between leaves only rows that
the next pass removes. SQLite reuses the freed pages, so a database under steady churn
stops growing.
"""

from __future__ import annotations

import apsw

from .. import models
from ..errors import Conflict
from .base import StoreBase


class RetentionQueries(StoreBase):
    def batch_delete(self, batch_id: str, tenant: str | None, now: float) -> None:
        """Delete an ended batch (409 while it runs): gone at once for every reader, its
        rows removed by `doomed_prune`."""
        row = self._batch_row_by_id(batch_id, tenant)
        if row.status not in models.BATCH_TERMINAL:
            raise Conflict(f"batch {batch_id} has not ended ({row.status}); cancel it first")
        with self._tx() as cur:
            self._doom(cur, [row.seq], now)

    def batches_delete_ended(self, before: float, limit: int, now: float) -> int:
        """Delete up to `limit` batches that ended before `before` (retention); returns
        how many."""
        with self._tx() as cur:
            seqs = [r[0] for r in cur.execute(
                "SELECT seq FROM batches WHERE completed_at IS NOT NULL AND completed_at<?"
                " ORDER BY completed_at LIMIT ?", (before, limit))]
            self._doom(cur, seqs, now)
        return len(seqs)

    @staticmethod
    def _doom(cur: apsw.Cursor, seqs: list[int], now: float) -> None:
        """The batches' rows go, and their deliveries still to send end (a deleted batch
        sends nothing more); the rest waits in `doomed` for `doomed_prune`."""
        for seq in seqs:
            cur.execute("UPDATE deliveries SET status='failed', failure_reason_code="
                        "'batch_deleted', next_attempt_at=NULL, completed_at=? WHERE batch=?"
                        " AND status IN ('pending', 'sending')", (now, seq))
            cur.execute("DELETE FROM file_parts WHERE file IN (SELECT id FROM files WHERE"
                        " batch=?)", (seq,))
            cur.execute("DELETE FROM files WHERE batch=?", (seq,))
            cur.execute("DELETE FROM batches WHERE seq=?", (seq,))
            cur.execute("DELETE FROM batch_ticks WHERE batch=?", (seq,))  # a row a second
            cur.execute("INSERT INTO doomed VALUES (?) ON CONFLICT DO NOTHING", (seq,))

    def file_delete(self, file_id: str, tenant: str) -> None:
        """Delete a finished file: gone at once, its lines removed by `doomed_prune`
        (batches made from it keep their items)."""
        self.file_get(file_id, tenant)
        with self._tx() as cur:
            cur.execute("DELETE FROM file_parts WHERE file=?", (file_id,))
            cur.execute("DELETE FROM files WHERE id=?", (file_id,))
            cur.execute("INSERT INTO doomed_files VALUES (?) ON CONFLICT DO NOTHING", (file_id,))

    def doomed_prune(self, chunk: int) -> int:
        """Remove up to `chunk` rows of deleted batches (items first, then attempts and
        deliveries) or files (their lines) in one transaction; returns how many (0:
        nothing is left)."""
        with self._tx() as cur:
            doomed = self._one("SELECT batch FROM doomed LIMIT 1")
            if doomed is None:
                return self._prune_file(cur, chunk)
            seq, removed = doomed[0], 0
            for sql in (
                    "DELETE FROM items WHERE seq IN (SELECT seq FROM items WHERE batch=?"
                    " LIMIT ?)",
                    "DELETE FROM attempts WHERE rowid IN (SELECT a.rowid FROM attempts a"
                    " JOIN deliveries d ON a.delivery=d.seq WHERE d.batch=? LIMIT ?)",
                    "DELETE FROM deliveries WHERE seq IN (SELECT seq FROM deliveries WHERE"
                    " batch=? LIMIT ?)"):
                cur.execute(sql, (seq, chunk - removed))
                removed += self.conn.changes()
                if removed >= chunk:
                    return removed
            cur.execute("DELETE FROM doomed WHERE batch=?", (seq,))
            return removed + 1

    def _prune_file(self, cur: apsw.Cursor, chunk: int) -> int:
        doomed = self._one("SELECT file FROM doomed_files LIMIT 1")
        if doomed is None:
            return 0
        cur.execute("DELETE FROM file_lines WHERE file=? AND line IN (SELECT line FROM"
                    " file_lines WHERE file=? LIMIT ?)", (doomed[0], doomed[0], chunk))
        removed = self.conn.changes()
        if removed < chunk:
            cur.execute("DELETE FROM doomed_files WHERE file=?", (doomed[0],))
            removed += 1
        return removed
