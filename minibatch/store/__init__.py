"""All SQL: the schema and its migrations, one method per query, rows -> Structs.

Plain synchronous code on one apsw connection; the async side decides when a call is
long enough to go to a thread. Every state change is one `BEGIN IMMEDIATE` transaction
(`_tx`), and whatever it causes - batch counters, the terminal transition, the webhook
delivery rows - is written inside that same transaction.

`Store` (interface.py) is the one boundary the runner, the deliverer and the API talk
to; `SqliteStore` implements it, a file per noun holding its queries. Method names read
noun first: `batch_insert`, `items_claim`, `items_finish`, `deliveries_claim`, ...
"""

from __future__ import annotations

from .accounts import AccountQueries
from .batches import BatchQueries
from .deliveries import DeliveryQueries
from .endpoints import EndpointQueries, EndpointRow
from .interface import Store
from .items import ItemQueries
from .maintenance import MaintenanceQueries
from .retention import RetentionQueries
from .rows import (
    BatchRow,
    Claimed,
    FileRow,
    Outcome,
    batch_struct,
    error_bytes,
    item_id,
    new_id,
    readable_error,
    sanitize_url,
)
from .schema import MIGRATIONS
from .views import ERRORS_SCANNED, ViewQueries


class SqliteStore(BatchQueries, ItemQueries, DeliveryQueries, AccountQueries, EndpointQueries,
                  MaintenanceQueries, RetentionQueries, ViewQueries):
    """One SQLite database file (WAL) holding every batch, item, delivery and key."""

    def counts(self) -> dict[str, dict[str, int]]:
        """Totals for /metrics: items by status, deliveries by status (all tenants)."""
        # The batch counters add up to the items by status, and are far fewer rows to read.
        sums = self._one("SELECT total(queued), total(running), total(succeeded),"
                         " total(failed), total(cancelled), total(expired) FROM batches")
        items = dict(zip(("queued", "running", "succeeded", "failed", "cancelled", "expired"),
                         map(int, sums), strict=True))
        deliveries: dict[str, int] = {}
        for status, n in self.conn.execute("SELECT status, n FROM delivery_counts"):
            if n:
                public = "pending" if status == "sending" else status  # as PUBLIC_STATUS
                deliveries[public] = deliveries.get(public, 0) + n
        return {"items": items, "deliveries": deliveries}


__all__ = ["ERRORS_SCANNED", "MIGRATIONS", "BatchRow", "Claimed", "EndpointRow", "FileRow",
           "Outcome", "SqliteStore", "Store",
           "batch_struct",
           "error_bytes", "item_id", "new_id", "readable_error", "sanitize_url"]
