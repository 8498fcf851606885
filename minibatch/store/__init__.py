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


def open_store(db: str, *, synchronous: str = "normal",
               webhook_schedule: tuple[float, ...] = (0.0,)) -> Store:
    """The store `db` names: a `postgresql://` (or `postgres://`) URL, else a SQLite
    file (":memory:" for tests)."""
    if db.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore  # psycopg is needed only for PostgreSQL

        return PostgresStore(db, synchronous=synchronous, webhook_schedule=webhook_schedule)
    return SqliteStore(db, synchronous=synchronous, webhook_schedule=webhook_schedule)


__all__ = ["ERRORS_SCANNED", "MIGRATIONS", "BatchRow", "Claimed", "EndpointRow", "FileRow",
           "Outcome", "SqliteStore", "Store", "batch_struct", "error_bytes", "item_id",
           "new_id", "open_store", "readable_error", "sanitize_url"]
