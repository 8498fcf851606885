"""The connection under every query: pragmas, transactions, migrations."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import apsw

from ..errors import StorageUnavailable, StoreBusy
from .schema import MIGRATIONS

if TYPE_CHECKING:
    from ..models import DeliverySummary, FailedWebhook
    from .rows import BatchRow, FileRow

P = ParamSpec("P")
T = TypeVar("T")
LOCK_WAIT_S = 10.0  # how long a write waits for another connection's lock, by default
LOCK_POLL_S = 0.001  # how often it looks again meanwhile
_STORAGE_FAULTS = (apsw.FullError, apsw.IOError, apsw.ReadOnlyError, apsw.CantOpenError,
                   apsw.BusyError)


def _wait_briefly(tries: int) -> bool:
    """The busy handler of a connection that waits for the write lock: look again every
    millisecond, up to LOCK_WAIT_S. SQLite's own (`busy_timeout`) sleeps longer at each
    try, up to 100 ms, so a writer that waits lost the lock, again and again, to worker
    processes that retry every 2 ms: POSTs beside `--workers 2` fell to ~140/s."""
    if tries * LOCK_POLL_S >= LOCK_WAIT_S:
        return False
    time.sleep(LOCK_POLL_S)
    return True


class StoreBase:
    """The connection: pragmas, migrations, and the one way to write (`_tx`)."""

    def __init__(self, path: str, *, synchronous: str = "normal",
                 webhook_schedule: tuple[float, ...] = (0.0,)) -> None:
        self.path = path
        self._synchronous, self._webhook_schedule = synchronous, webhook_schedule
        self._checkpointer: apsw.Connection | None = None
        # A new delivery is due after the schedule's first delay, for len(schedule) attempts.
        self.webhook_attempts = len(webhook_schedule)
        self.webhook_first_delay = webhook_schedule[0]
        try:
            self.conn = apsw.Connection(path)
        except apsw.CantOpenError as exc:
            raise StorageUnavailable(f"cannot open database {path!r}: {exc}") from None
        self.wait_for_lock(True)
        try:
            if path != ":memory:":
                self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute(
                f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            self.conn.execute("PRAGMA temp_store=MEMORY")
            self.migrate()
        except (apsw.NotADBError, apsw.CorruptError) as exc:
            self.conn.close()
            raise StorageUnavailable(f"{path!r} is not a readable database: {exc}") from None

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.conn.close()

    def another(self) -> Any:
        """A second connection to the same database, for a worker thread's own use; None
        where there can be only one (":memory:")."""
        if self.path == ":memory:":
            return None
        return type(self)(self.path, synchronous=self._synchronous,
                          webhook_schedule=self._webhook_schedule)

    def wait_for_lock(self, wait: bool) -> None:
        """Whether a write waits (up to 10 s, in the calling thread) while another process
        holds the write lock, or raises StoreBusy at once so an event loop can yield and
        try again: a worker process's loops must not freeze while the API's process or
        another worker commits."""
        if wait:
            self.conn.set_busy_handler(_wait_briefly)
        else:
            self.conn.set_busy_timeout(0)

    def autocheckpoint(self, on: bool) -> None:
        """Let this connection's COMMITs checkpoint the WAL (SQLite's default), or leave
        that to `checkpoint()` so a writer on the event loop never pays for one."""
        self.conn.execute(f"PRAGMA wal_autocheckpoint={1000 if on else 0}")

    def checkpoint(self) -> None:
        """Copy committed WAL frames into the database file, on a connection of its own.

        PASSIVE never waits for or blocks writers, so it can run in a worker thread
        beside the event loop's writes."""
        if self.path == ":memory:":
            return
        if self._checkpointer is None:
            self._checkpointer = apsw.Connection(self.path)
            self._checkpointer.set_busy_timeout(1000)
        try:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except apsw.BusyError:
            pass  # another checkpoint is running; the next call catches up
        except _STORAGE_FAULTS as exc:
            raise StorageUnavailable(f"checkpoint failed: {exc}") from None

    _skip_locked = ""  # PostgreSQL's claims skip items another transaction holds

    @contextmanager
    def _tx(self, scope: str | None = None) -> Iterator[apsw.Cursor]:
        """One write transaction; storage faults become StorageUnavailable (503).
        `scope` names what the transaction must have to itself when writers can run side
        by side (PostgreSQL's claims of one kind); SQLite has one writer at a time."""
        cur = self.conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except apsw.BusyError as exc:
            raise StoreBusy(f"database is locked by another process: {exc}") from None
        except _STORAGE_FAULTS as exc:
            raise StorageUnavailable(f"database cannot be written: {exc}") from None
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:  # COMMIT may itself have failed
                self.conn.execute("ROLLBACK")
            if isinstance(exc, _STORAGE_FAULTS):
                raise StorageUnavailable(f"database cannot be written: {exc}") from None
            raise

    def read_version(self) -> Any:
        """A value that changes whenever anything stored may have changed: another
        connection committed (`PRAGMA data_version`), or this one changed a row
        (`total_changes` counts those even when rolled back: only a needless miss)."""
        return self._one("PRAGMA data_version")[0], self.conn.total_changes()

    def subscribe(self, on_kind: Callable[[str], None]) -> Callable[[], None]:
        """SQLite sends no notifications: processes on one file find work by polling."""
        return lambda: None

    def clock(self) -> float:
        """Now, in seconds since the epoch, by the clock the database's times follow."""
        return time.time()

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """At once, on the loop: a call into a local file takes microseconds, a thread hop
        ~90 µs (measured here), and nothing suspending keeps SQLite's one-writer
        scheduling as it is."""
        return fn(*args, **kwargs)

    def _one(self, sql: str, args: tuple = ()) -> Any:
        for row in self.conn.execute(sql, args):
            return row
        return None

    def _all(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        """Every row of a read; typed Any, as columns hold what the schema says."""
        return self.conn.execute(sql, tuple(args)).fetchall()

    def _update_many(self, cur: apsw.Cursor, sql: str, rows: list[tuple]) -> int:
        """`sql` once per row, in the caller's transaction; how many rows it changed in
        all (`changes()` after an executemany counts its last statement only)."""
        before = self.conn.total_changes()
        cur.executemany(sql, rows)
        return self.conn.total_changes() - before

    if TYPE_CHECKING:
        # What one noun's queries call of another's, within the caller's transaction;
        # `Store` combines the files that define them.
        def _batch_row(self, seq: int) -> BatchRow: ...
        def file_get(self, file_id: str, tenant: str) -> FileRow: ...
        def _batch_row_by_id(self, batch_id: str, tenant: str | None) -> BatchRow: ...
        def _batch_finish_if_done(self, cur: apsw.Cursor, seq: int, now: float) -> None: ...
        def _cancel_queued(self, cur: apsw.Cursor, batch_seq: int, now: float) -> None: ...
        def _expire_queued(self, cur: apsw.Cursor, batch_seq: int, now: float) -> None: ...
        def _delivery_insert(self, cur: apsw.Cursor, row: BatchRow, event: str,
                             payload: bytes, now: float, *, url: str | None = None,
                             endpoint: str | None = None) -> None: ...
        def _endpoints_for(self, tenant: str, event: str) -> list[tuple[str, str]]: ...
        def _secret_rotate(self, cur: apsw.Cursor, tenant: str, secret_id: str, secret: str,
                           overlap_s: float, now: float, endpoint: str | None
                           ) -> tuple[str | None, float | None]: ...
        def _output_files_insert(self, cur: apsw.Cursor, row: BatchRow, now: float
                                 ) -> None: ...
        def _delivery_summary(self, batch_seq: int
                              ) -> tuple[DeliverySummary, list[FailedWebhook]]: ...
        def _idempotency_put(self, cur: apsw.Cursor, tenant: str,
                             idempotency: tuple[str, bytes, int, Any], created: Any,
                             now: float) -> None: ...

    def schema_version(self) -> int:
        return self._one("PRAGMA user_version")[0]

    def migrate(self) -> None:
        """Apply each numbered migration not yet recorded in `user_version`."""
        with self._tx() as cur:
            version = self.schema_version()
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                cur.execute(script)
                cur.execute(f"PRAGMA user_version={number}")

    def schema_sql(self) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")]
