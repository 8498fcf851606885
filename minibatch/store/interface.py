"""`Store`: the one interface the runner, the deliverer, the API and the app use.

Every method is one statement or one transaction of the store behind it; callers never
see SQL, connections or which database is in use. The methods are synchronous; code on an
event loop calls them through `await store.call(store.method, ...)`, which takes a
PostgreSQL round trip off the loop. `SqliteStore` implements it today;
mypy checks that it does (app.py holds a `SqliteStore` as a `Store`). A second store
(PostgreSQL) implements the same methods with the same guarantees: each write is one
transaction, and whatever it causes (counters, the terminal transition, webhook rows)
is written inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, Protocol, TypeVar

from .. import models
from ..models import Batch, Delivery, ItemRecord
from .endpoints import EndpointRow
from .rows import BatchRow, Claimed, FileRow, Outcome

P = ParamSpec("P")
T = TypeVar("T")
Idempotency = tuple[str, bytes, int, Any]  # (key, body hash, status, response builder)


class Store(Protocol):
    # -- batches ----------

    def batch_insert(self, *, tenant: str, kind: str, items: Iterable[Any], now: float,
                     metadata: dict | None = None, webhook: models.WebhookIn | None = None,
                     max_attempts: int, item_timeout_s: float | None = None,
                     concurrency: int | None = None, input_file_id: str | None = None,
                     idempotency: Idempotency | None = None, expires_at: float | None = None,
                     dialect: str = "native", dialect_data: dict | None = None,
                     id_prefix: str = "batch", max_queued: int | None = None) -> BatchRow:
        """A batch and its items (read lazily in chunks) in one transaction; InvalidInput
        and nothing written if any item is bad, TooManyRequests if the tenant would have
        more than `max_queued` items queued."""
        ...

    def batch_insert_refused(self, *, tenant: str, kind: str, now: float,
                             metadata: dict | None, dialect: str, dialect_data: dict,
                             idempotency: Idempotency | None = None) -> BatchRow:
        """A batch that ends `failed` as it is made, with no items, and its events."""
        ...

    def batch_row(self, batch_id: str, tenant: str | None) -> BatchRow: ...

    def batch_rows(self, batch_ids: list[str], tenant: str) -> list[BatchRow]: ...
    def batch_get(self, batch_id: str, tenant: str | None = None) -> Batch: ...
    def batch_seq(self, batch_id: str, tenant: str | None) -> int: ...
    def batch_status(self, batch_id: str) -> str: ...

    def batches_list(self, tenant: str | None, *, status: str | None, limit: int,
                     after: str | None) -> tuple[list[Batch], bool]:
        """Newest first, after the batch whose id is `after`; and whether more follow."""
        ...

    def batch_rows_list(self, tenant: str, *, dialect: str, after: str | None, limit: int,
                        before: str | None = None) -> tuple[list[BatchRow], bool]: ...
    def batch_delete(self, batch_id: str, tenant: str | None, now: float) -> None: ...
    def batches_delete_ended(self, before: float, limit: int, now: float) -> int: ...
    def doomed_prune(self, chunk: int) -> int: ...

    def batch_cancel(self, batch_id: str, tenant: str | None, now: float
                     ) -> tuple[Batch, int]:
        """Cancel queued items now; returns the batch and its seq (409 if terminal)."""
        ...

    def batches_cancelling(self, seqs: Iterable[int]) -> list[int]: ...

    def batches_expire(self, now: float) -> list[int]:
        """Expire the items not started of batches past their `expires_at`."""
        ...

    def batches_fail_unknown_kinds(self, kinds: Iterable[str], now: float) -> list[str]:
        """Fail the queued items of open batches whose kind is not in `kinds` and no
        live lease (`leases_extend`) names."""
        ...

    # -- items and leases ----------

    def items_claim(self, kind: str, limit: int, owner: str, now: float,
                    lease_s: float) -> list[Claimed]:
        """Up to `limit` due items of `kind`, shared between its batches, leased."""
        ...

    def items_finish(self, outcomes: list[Outcome], owner: str, now: float) -> int:
        """Write outcomes whose lease (owner and token) still holds; the rest are dropped."""
        ...

    def items_rescue(self, now: float, *, except_owner: str | None = None) -> int:
        """Requeue (or fail, out of attempts) items whose lease expired."""
        ...

    def items_release(self, owner: str, now: float) -> int:
        """Hand an owner's running items back without counting the attempt."""
        ...

    def leases_extend(self, owner: str, until: float, kinds: Iterable[str] = ()) -> int:
        """Extend an owner's leases on its running items (returns how many) and on the
        kinds it serves (which `batches_fail_unknown_kinds` then leaves alone)."""
        ...

    def leases_expire(self, owner: str) -> int: ...
    def lease_owners(self) -> list[str]: ...

    def items_page(self, batch_id: str, tenant: str | None, *, status: str | None,
                   limit: int, after: int) -> tuple[list[ItemRecord], bool]: ...

    def results_page(self, batch_seq: int, after: int, limit: int) -> list[tuple]:
        """Raw terminal rows (idx, seq, entry_id, status, output, error, attempts)."""
        ...

    # -- deliveries ----------

    def deliveries_claim(self, now: float, limit: int, lease_s: float) -> list[tuple]: ...

    def deliveries_record(self, records: list) -> None:
        """Record attempts (delivery.AttemptRecord) and what follows each, in one go."""
        ...

    def deliveries_page(self, batch_seq: int, *, limit: int, after: str | None
                        ) -> tuple[list[Delivery], bool]: ...

    def delivery_redeliver(self, delivery_id: str, tenant: str | None, now: float
                           ) -> Delivery: ...

    # -- tenants, keys, secrets ----------

    def tenant_create(self, name: str, key_hash: bytes, secret_id: str, secret: str,
                      now: float, *, key_id: str, key_name: str | None = None) -> None: ...
    def tenant_exists(self, name: str) -> bool: ...
    def tenant_by_key(self, key_hash: bytes, now: float) -> tuple[str, float] | None: ...
    def keys_list(self, tenant: str | None) -> list[dict[str, Any]]: ...
    def key_revoke(self, key_id: str, now: float) -> None: ...

    def secrets_active(self, tenant: str, now: float, endpoint: str | None = None
                       ) -> list[tuple[str, str]]:
        """(id, secret) pairs that sign now, the primary first: the tenant's, or those of
        one of its webhook endpoints."""
        ...

    def secret_rotate(self, tenant: str, secret_id: str, secret: str, overlap_s: float,
                      now: float, endpoint: str | None = None
                      ) -> tuple[str | None, float | None]: ...

    # -- webhook endpoints ----------

    def endpoint_create(self, tenant: str, name: str, url: str, event_types: list[str],
                        secret_id: str, secret: str, now: float) -> EndpointRow: ...
    def endpoint_get(self, endpoint_id: str, tenant: str) -> EndpointRow: ...
    def endpoints_list(self, tenant: str, *, after: str | None, limit: int
                       ) -> tuple[list[EndpointRow], bool]: ...
    def endpoint_update(self, endpoint_id: str, tenant: str, now: float, *,
                        name: str | None = None, url: str | None = None,
                        event_types: list[str] | None = None) -> EndpointRow: ...
    def endpoint_delete(self, endpoint_id: str, tenant: str) -> None: ...
    def endpoint_rotate(self, endpoint_id: str, tenant: str, secret_id: str, secret: str,
                        overlap_s: float, now: float) -> EndpointRow: ...

    # -- files and idempotency ----------

    def file_begin(self, tenant: str, filename: str | None, size: int, now: float,
                   purpose: str | None = None, expires_at: float | None = None) -> str:
        """A new file, invisible until `file_finish`."""
        ...

    def file_lines_insert(self, file_id: str, lines: list[tuple]) -> None: ...

    def file_finish(self, file_id: str, lines: int, idempotency: Idempotency | None = None,
                    build: Any = None) -> Any: ...

    def file_get(self, file_id: str, tenant: str) -> FileRow: ...
    def files_list(self, tenant: str, *, purpose: str | None, after: str | None, limit: int,
                   newest_first: bool) -> tuple[list[FileRow], bool]: ...
    def file_delete(self, file_id: str, tenant: str) -> None: ...
    def file_set_bytes(self, file_id: str, size: int) -> None: ...
    def file_part_insert(self, file_id: str, part: int, data: bytes) -> None: ...
    def file_parts_page(self, file_id: str, after: int, limit: int
                        ) -> list[tuple[int, bytes]]: ...

    def file_problems(self, file_id: str, url: str, limit: int) -> list[tuple]:
        """The first `limit` bad lines of a dialect's file (a problem, or a url other
        than `url`)."""
        ...

    def batch_files(self, batch_seq: int) -> dict[str, str]: ...

    def file_discard(self, file_id: str, chunk: int) -> bool:
        """Delete up to `chunk` lines of an unfinished file; True while lines remain."""
        ...

    def idempotency_get(self, tenant: str, key: str, since: float) -> tuple | None: ...
    def idempotency_prune(self, before: float) -> None: ...

    # -- the dashboard ----------

    def items_error_groups(self, batch_seq: int, limit: int) -> list[tuple[str, str, int]]:
        """(code, message, count) of failed items, most frequent first (a bounded scan)."""
        ...

    def batch_throughput(self, batch_seq: int, buckets: int) -> tuple[int, int, list[int]]:
        """(first second, seconds per bucket, items ended per bucket)."""
        ...

    def endpoint_health(self, endpoint_id: str) -> dict[str, Any]: ...
    def session_create(self, token_hash: bytes, key_hash: bytes, csrf: str, now: float,
                       expires_at: float) -> None: ...
    def session_get(self, token_hash: bytes, now: float) -> tuple[bytes, str] | None: ...
    def session_delete(self, token_hash: bytes) -> None: ...

    # -- the whole store ----------

    def counts(self) -> dict[str, dict[str, int]]:
        """Items and deliveries by status, all tenants (for /metrics)."""
        ...

    def subscribe(self, on_kind: Callable[[str], None]) -> Callable[[], None]:
        """Call `on_kind(kind)` (in a thread of the store's) whenever any process submits
        items of `kind`; returns what stops it."""
        ...

    def read_version(self) -> Any:
        """A value equal to the last one only if nothing stored has changed since, by
        any connection: what was read under it may be reused. A store that cannot tell
        cheaply returns a new value every time."""
        ...

    def clock(self) -> float:
        """Now, by the database's clock (PostgreSQL's; this machine's for SQLite)."""
        ...

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` (one store method, or a function of several) as an event
        loop must call it: where a call is a network round trip (PostgreSQL) it runs in a
        worker thread, so the loop serves others meanwhile; where it is a local file
        (SQLite: microseconds, and a thread hop would cost more than the call) it runs at
        once and never suspends."""
        ...

    def another(self) -> Store | None: ...
    def wait_for_lock(self, wait: bool) -> None: ...
    def backup_to(self, dest: str) -> int: ...
    def check(self) -> list[str]: ...
    def autocheckpoint(self, on: bool) -> None: ...
    def checkpoint(self) -> None: ...
    def close(self) -> None: ...
