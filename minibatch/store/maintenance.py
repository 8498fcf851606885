"""The database as a whole: a consistent copy while others write, and its checks."""

from __future__ import annotations

import apsw

from ..errors import StorageUnavailable
from .base import StoreBase

ITEM_COUNTERS = ("queued", "running", "succeeded", "failed", "cancelled", "expired")


class MaintenanceQueries(StoreBase):
    def backup_to(self, dest: str) -> int:
        """Copy the whole database to a new file `dest`, as one snapshot (SQLite's online
        backup in a single step: one read transaction, which in WAL mode blocks no
        writer). Returns the pages copied."""
        try:
            target = apsw.Connection(dest)
        except apsw.Error as exc:
            raise StorageUnavailable(f"cannot write a backup to {dest!r}: {exc}") from None
        try:
            with target.backup("main", self.conn, "main") as backup:
                backup.step(-1)
                pages = backup.page_count
            target.execute("PRAGMA journal_mode=WAL")
        except apsw.Error as exc:
            raise StorageUnavailable(f"backup to {dest!r} failed: {exc}") from None
        finally:
            target.close()
        return pages

    def check(self) -> list[str]:
        """Every problem found, as one line each (none: an empty list): SQLite's integrity
        check, and each batch's counters against its items, in one read transaction."""
        try:
            problems = self._integrity_problems()
            with self.conn:  # one snapshot for the counters and the rows they count
                problems += self._counter_problems() + self._delivery_count_problems()
        except (apsw.Error, StorageUnavailable) as exc:
            problems = [f"the database cannot be read: {exc}"]
        return problems

    def _integrity_problems(self) -> list[str]:
        return [f"integrity: {row[0]}" for row in self.conn.execute("PRAGMA integrity_check")
                if row[0] != "ok"]

    def counts(self) -> dict[str, dict[str, int]]:
        """Totals for /metrics: items by status, deliveries by status (all tenants)."""
        # The batch counters add up to the items by status, and are far fewer rows to read.
        sums = self._one("SELECT coalesce(sum(queued), 0), coalesce(sum(running), 0),"
                         " coalesce(sum(succeeded), 0), coalesce(sum(failed), 0),"
                         " coalesce(sum(cancelled), 0), coalesce(sum(expired), 0)"
                         " FROM batches")
        items = dict(zip(("queued", "running", "succeeded", "failed", "cancelled", "expired"),
                         map(int, sums), strict=True))
        deliveries: dict[str, int] = {}
        for status, n in self.conn.execute("SELECT status, n FROM delivery_counts"):
            if n:
                public = "pending" if status == "sending" else status  # as PUBLIC_STATUS
                deliveries[public] = deliveries.get(public, 0) + int(n)
        return {"items": items, "deliveries": deliveries}

    def _delivery_count_problems(self) -> list[str]:
        kept = {s: n for s, n in self.conn.execute("SELECT status, n FROM delivery_counts")
                if n}
        counted = dict(self.conn.execute(
            "SELECT status, count(*) FROM deliveries GROUP BY status"))
        return [f"deliveries {status}: counted {kept.get(status, 0)}, stored"
                f" {counted.get(status, 0)}" for status in sorted(set(kept) | set(counted))
                if kept.get(status, 0) != counted.get(status, 0)]

    def _counter_problems(self) -> list[str]:
        counted = {(batch, status): n for batch, status, n in self.conn.execute(
            "SELECT batch, status, count(*) FROM items GROUP BY batch, status")}
        problems = []
        columns = ", ".join(ITEM_COUNTERS)
        for seq, batch_id, status, total, *counters in self.conn.execute(
                f"SELECT seq, id, status, total, {columns} FROM batches"):
            for name, value in zip(ITEM_COUNTERS, counters, strict=True):
                if value != counted.get((seq, name), 0):
                    problems.append(f"batch {batch_id}: metrics.{name} is {value}, its items"
                                    f" say {counted.get((seq, name), 0)}")
            if sum(counters) != total:
                problems.append(f"batch {batch_id}: metrics add up to {sum(counters)}, not"
                                f" its total {total}")
            if status in ("completed", "failed", "cancelled", "expired") and (
                    counters[0] or counters[1]):
                problems.append(f"batch {batch_id} is {status} with items queued or running")
        return problems
