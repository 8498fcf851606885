"""`PostgresStore`: the same queries as `SqliteStore`, on PostgreSQL through psycopg 3.

The query files (batches, items, deliveries, ...) are shared: they are written in the
SQL both databases read, with `?` placeholders. `PgConnection` gives them the small part
of apsw's connection they use (`execute`, `cursor`, `executemany` with RETURNING,
`changes`), translating each statement once: `?` and `?N` become psycopg placeholders,
`IS [NOT] ?` becomes `IS [NOT] DISTINCT FROM`, SQLite's `INDEXED BY` hint is dropped
(PostgreSQL's planner reads the literal status itself). What differs in substance lives
here: the schema's migrations under an advisory lock, the transaction, the read version,
the clock, JSON reads, checks and backups.

Every write transaction but a claim first takes one advisory lock (`WRITE_LOCK`), so
those writes are serialized across every process and machine as SQLite serializes them:
the counters, caps and terminal transitions the query files compute inside a transaction
stay exact however many processes share the database. A claim runs beside them, under a
lock of its kind only (claims of one kind are one at a time, so a batch's cap is read and
spent by one claim at a time): it locks the batches it serves (FOR UPDATE, in seq order,
as every transaction that writes several batches does), takes due items with FOR UPDATE
SKIP LOCKED, and moves only items still queued, so a cancel or an expiry committed
meanwhile wins. Reads take no lock.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, ParamSpec, TypeVar

import anyio
import anyio.to_thread
import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from ..errors import InvalidInput, StorageUnavailable
from . import views
from .accounts import AccountQueries
from .batches import BatchQueries
from .deliveries import DeliveryQueries
from .endpoints import EndpointQueries
from .items import DueBatch, ItemQueries
from .maintenance import MaintenanceQueries
from .pg_schema import PG_MIGRATIONS
from .retention import RetentionQueries
from .views import ViewQueries

P = ParamSpec("P")
T = TypeVar("T")
WRITE_LOCK = 0x6D62_7772  # "mbwr": the advisory lock every write transaction holds
MIGRATE_LOCK = 0x6D62_6D67  # "mbmg": held while migrations run
CHANNEL = "minibatch_work"  # NOTIFY's payload: the kind of a batch just submitted
LISTEN_POLL_S = 0.5  # how often the listening thread looks at its stop flag
CLOCK_REFRESH_S = 60.0  # how often the offset to the database's clock is measured again
POOL_SIZE = 8  # connections a store may open; one is opened at start, the rest on demand
POOL_WAIT_S = 1.0  # how long a thread (an event loop's) waits for a connection, then 503
CONNECT_TIMEOUT_S = 10
FILE_LINE_TYPES = ["text", "bigint", "text", "bytea", "bytea", "text", "bytea"]  # file_lines
OPEN = (TransactionStatus.INTRANS, TransactionStatus.INERROR)  # a transaction not ended
_NUMBERED = re.compile(r"\?(\d+)")
_IS = re.compile(r"\bIS(\s+NOT)?\s+(\?\d*)")
_INDEXED_BY = re.compile(r"\s+INDEXED BY \w+")


def is_url(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


@lru_cache(maxsize=2048)
def translate(sql: str) -> tuple[str, bool]:
    """A statement of the query files in psycopg's placeholders; and whether it numbers
    its parameters (`?1`), which then go by name (`%(p1)s`)."""
    sql = _INDEXED_BY.sub("", sql).replace("%", "%%")
    sql = _IS.sub(lambda m: f"IS {'' if m.group(1) else 'NOT '}DISTINCT FROM {m.group(2)}",
                  sql)
    numbered = bool(_NUMBERED.search(sql))
    if numbered:
        return _NUMBERED.sub(r"%(p\1)s", sql), True
    return sql.replace("?", "%s"), False


def _param(value: Any) -> Any:
    """A value as the schema holds it: booleans are integers (as in SQLite), and a text
    cannot hold NUL in PostgreSQL (a webhook response body may), so it becomes U+FFFD."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _params(args: Sequence[Any], numbered: bool) -> Any:
    values = [_param(v) for v in args]
    return {f"p{i}": v for i, v in enumerate(values, start=1)} if numbered else values


class PgCursor:
    """What the query files use of an apsw cursor: execute, executemany, the rows."""

    def __init__(self, conn: PgConnection) -> None:
        self.conn = conn
        self.rows: list[Any] = []

    def execute(self, sql: str, args: Sequence[Any] = ()) -> PgCursor:
        text, numbered = translate(sql)
        with self.conn.held() as raw, raw.cursor() as cur:
            cur.execute(text, _params(args, numbered))
            self.rows = cur.fetchall() if cur.description else []
            self.conn.count_changes(max(cur.rowcount, 0))
        return self

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> PgCursor:
        text, numbered = translate(sql)
        params = [_params(args, numbered) for args in seq]
        self.rows = []
        if not params:
            return self
        with self.conn.held() as raw, raw.cursor() as cur:
            returning = " RETURNING " in text.upper()
            cur.executemany(text, params, returning=returning)
            if returning:
                while True:
                    self.rows += cur.fetchall()
                    if not cur.nextset():
                        break
                self.conn.count_changes(len(self.rows))
            else:
                self.conn.count_changes(max(cur.rowcount, 0))
        return self

    def fetchall(self) -> list[Any]:
        return self.rows

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


class PgConnection:
    """psycopg's connection pool behind the part of apsw's connection API the query
    files call. A thread takes a connection from the pool for each statement, or for a
    whole transaction, whose statements then all go to it; so the threads of a process
    (the API's, the items', the pruner's) never wait for each other's round trips, and a
    connection the server dropped (a restart, a failover, an idle timeout) is replaced
    by the pool instead of failing every later call."""

    def __init__(self, url: str) -> None:
        try:  # one connection first, for psycopg's own message if the server refuses
            psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S).close()
        except psycopg.Error as exc:
            raise StorageUnavailable(f"cannot connect to {redact(url)}: {exc}") from None
        self.pool = ConnectionPool(url, min_size=1, max_size=POOL_SIZE, open=False,
                                   num_workers=1, timeout=POOL_WAIT_S,
                                   kwargs={"autocommit": True})
        try:
            self.pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except (PoolTimeout, PoolClosed) as exc:
            self.pool.close()
            raise StorageUnavailable(f"cannot connect to {redact(url)}: {exc}") from None
        self._thread = threading.local()  # .raw, .depth, .snapshot: this thread's

    @contextmanager
    def held(self) -> Iterator[psycopg.Connection]:
        """This thread's connection, taken from the pool if it holds none, until the
        outermost `held` ends. A dropped connection is a 503 for that call alone: the
        pool then tests the idle ones and replaces those dropped too."""
        thread = self._thread
        depth = getattr(thread, "depth", 0)
        if depth == 0:
            try:
                thread.raw = self.pool.getconn()
            except (PoolTimeout, PoolClosed) as exc:  # none free in time, or closed
                raise StorageUnavailable(f"no database connection: {exc}") from None
        thread.depth = depth + 1
        raw = thread.raw
        try:
            yield raw
        except psycopg.OperationalError as exc:
            raise StorageUnavailable(f"database unavailable: {exc}") from None
        finally:
            thread.depth = depth
            if depth == 0:
                thread.raw = None
                self.pool.putconn(raw)
                if raw.closed:  # the others idle in the pool were likely dropped with it
                    self.pool.check()

    def execute(self, sql: str, args: Sequence[Any] = ()) -> PgCursor:
        return PgCursor(self).execute(sql, args)

    def cursor(self) -> PgCursor:
        return PgCursor(self)

    def count_changes(self, rows: int) -> None:
        self._thread.changes = rows

    def changes(self) -> int:
        """The rows this thread's last statement changed, as apsw's `changes()`."""
        return getattr(self._thread, "changes", 0)

    @property
    def in_transaction(self) -> bool:
        raw = getattr(self._thread, "raw", None)
        return raw is not None and raw.info.transaction_status in OPEN

    @contextmanager
    def transaction(self, begin: str = "BEGIN") -> Iterator[psycopg.Connection]:
        """One transaction on this thread's connection, committed if its block ends
        without an exception, rolled back if not."""
        with self.held() as raw:
            raw.execute(begin)
            try:
                yield raw
            except BaseException:
                if raw.info.transaction_status in OPEN:  # not if the connection is gone
                    raw.execute("ROLLBACK")
                raise
            raw.execute("COMMIT")

    def __enter__(self) -> PgConnection:
        """`with conn:` as in apsw: one transaction (here with one snapshot), this
        thread's own."""
        snapshot = self.transaction("BEGIN ISOLATION LEVEL REPEATABLE READ")
        snapshot.__enter__()
        self._thread.snapshot = snapshot
        return self

    def __exit__(self, *exc: Any) -> None:
        snapshot, self._thread.snapshot = self._thread.snapshot, None
        snapshot.__exit__(*exc)

    def close(self) -> None:
        self.pool.close()


def scope_lock(scope: str) -> int:
    """The advisory lock (a signed 64-bit key) of a transaction's scope."""
    return int.from_bytes(hashlib.sha256(scope.encode()).digest()[:8], "big", signed=True)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class PostgresBase:
    """The PostgreSQL side of StoreBase and what differs in substance from SQLite. Comes
    first in PostgresStore's bases, so its methods replace the SQLite ones."""

    conn: Any
    _next_batch_seq = "nextval('batch_seq')"
    _skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, *, synchronous: str = "normal",
                 webhook_schedule: tuple[float, ...] = (0.0,)) -> None:
        self.path = url
        self._synchronous, self._webhook_schedule = synchronous, webhook_schedule
        self._reads = 0  # read_version's count
        self.webhook_attempts = len(webhook_schedule)
        self.webhook_first_delay = webhook_schedule[0]
        self.conn = PgConnection(url)
        self._limiter: anyio.CapacityLimiter | None = None  # made on the first loop's call
        self._measure_clock()  # sets _clock_offset, _clock_at
        self.migrate()

    # -- the connection ----------

    def close(self) -> None:
        self.conn.close()

    def another(self) -> Any:
        return type(self)(self.path, synchronous=self._synchronous,
                          webhook_schedule=self._webhook_schedule)

    def wait_for_lock(self, wait: bool) -> None:
        """Writers queue on the advisory lock; a wait there is short and never a 503."""

    def autocheckpoint(self, on: bool) -> None:
        """PostgreSQL checkpoints on its own."""

    def checkpoint(self) -> None:
        """PostgreSQL checkpoints on its own."""

    @contextmanager
    def _tx(self, scope: str | None = None) -> Iterator[Any]:  # a PgCursor, as apsw's
        """One write transaction, holding WRITE_LOCK until it ends; or, for a `scope`
        (the claims of one kind), that scope's own lock, beside the writers."""
        lock = WRITE_LOCK if scope is None else scope_lock(scope)
        with self.conn.transaction():
            cur = self.conn.cursor()
            cur.execute("SELECT pg_advisory_xact_lock(?)", (lock,))
            yield cur

    def _one(self, sql: str, args: tuple = ()) -> Any:
        rows = self.conn.execute(sql, args).rows
        return rows[0] if rows else None

    def _all(self, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        return self.conn.execute(sql, tuple(args)).rows

    def _update_many(self, cur: Any, sql: str, rows: list[tuple]) -> int:
        cur.executemany(sql, rows)
        return self.conn.changes()  # psycopg's rowcount sums an executemany's statements

    # -- the schema ----------

    def schema_version(self) -> int:
        row = self._one("SELECT max(version) FROM minibatch_schema")
        return (row[0] if row else None) or 0

    def migrate(self) -> None:
        """Apply each numbered migration not yet applied, once however many processes
        start together: they queue on MIGRATE_LOCK and find the work done."""
        with self.conn.transaction() as raw:
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            raw.execute("CREATE TABLE IF NOT EXISTS minibatch_schema"
                        " (version bigint PRIMARY KEY, applied_at timestamptz NOT NULL"
                        " DEFAULT now())")
            version = self.schema_version()
            for number, script in enumerate(PG_MIGRATIONS[version:], start=version + 1):
                raw.execute(script)
                raw.execute("INSERT INTO minibatch_schema (version) VALUES (%s)", (number,))

    def schema_sql(self) -> list[str]:
        return [f"{r[0]} {r[1]}" for r in self.conn.execute(
            "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = current_schema()"
            " ORDER BY 1, 2")]

    # -- what differs from SQLite ----------

    def read_version(self) -> int:
        """Never the same twice: another process's commits cannot be seen cheaply, so
        nothing read is reused."""
        self._reads += 1
        return self._reads

    def file_lines_insert(self, file_id: str, lines: list[tuple]) -> None:
        """COPY, not INSERTs: an uploaded file's lines go in at the server's bulk rate
        (3.8x the shared executemany's lines/s, measured in one run on 2026-12-02)."""
        with self._tx(), self.conn.held() as raw, raw.cursor() as pg, pg.copy(
                "COPY file_lines FROM STDIN") as copy:
            copy.set_types(FILE_LINE_TYPES)
            for line in lines:
                copy.write_row((file_id, *map(_param, line)))

    def items_error_groups(self, batch_seq: int, limit: int) -> list[tuple[str, str, int]]:
        return self._all(
            "SELECT e ->> 'code', e ->> 'message', count(*) FROM"
            " (SELECT convert_from(error, 'UTF8')::jsonb AS e FROM items WHERE batch=? AND"
            "  status='failed' ORDER BY idx LIMIT ?) AS failures GROUP BY 1, 2"
            " ORDER BY 3 DESC, 2 LIMIT ?", (batch_seq, views.ERRORS_SCANNED, limit))

    def _integrity_problems(self) -> list[str]:
        return []  # PostgreSQL checks its pages itself (data checksums, amcheck)

    def backup_to(self, dest: str) -> int:
        raise InvalidInput("minibatch backup copies SQLite files; back up PostgreSQL with"
                           " pg_dump or your provider's snapshots", [])

    def _batches_due(self, cur: Any, kind: str, now: float, limit: int) -> list[DueBatch]:
        """SQLite's choice of batches, then locked in seq order (the order every
        transaction locks batches in, so none waits on another in a cycle) and their
        `running` read again under the lock, which a batch's cap is checked against."""
        due = ItemQueries._batches_due(self, cur, kind, now, limit)  # type: ignore[arg-type]
        if not due:
            return due
        locked = dict(cur.execute(
            f"SELECT seq, running FROM batches WHERE seq IN ({','.join('?' * len(due))})"
            " AND completed_at IS NULL ORDER BY seq FOR UPDATE",
            [b.seq for b in due]).rows)
        return [b._replace(running=locked[b.seq]) for b in due if b.seq in locked and (
            b.concurrency is None or locked[b.seq] < b.concurrency)]

    def batch_insert(self, **spec: Any) -> Any:
        """Insert as SQLite does, then tell every listening process the kind has work."""
        row = BatchQueries.batch_insert(self, **spec)  # type: ignore[arg-type]
        self.conn.execute("SELECT pg_notify(?, ?)", (CHANNEL, spec["kind"]))
        return row

    def subscribe(self, on_kind: Callable[[str], None]) -> Callable[[], None]:
        """A thread on a connection of its own that LISTENs on CHANNEL; on a lost
        connection it connects again (polling covers the gap)."""
        stopped = threading.Event()

        def listen() -> None:
            while not stopped.is_set():
                try:
                    with psycopg.connect(self.path, autocommit=True) as conn:
                        conn.execute(f"LISTEN {CHANNEL}")
                        while not stopped.is_set():
                            for note in conn.notifies(timeout=LISTEN_POLL_S):
                                on_kind(note.payload)
                except psycopg.Error:
                    stopped.wait(LISTEN_POLL_S)

        threading.Thread(target=listen, name="minibatch-listen", daemon=True).start()
        return stopped.set  # the thread ends by itself within LISTEN_POLL_S

    def clock(self) -> float:
        """The database's time: this process's clock plus the offset to the server's,
        measured again every CLOCK_REFRESH_S, so leases and schedules agree across
        machines whose clocks do not. `call` measures it, in its thread; here it is
        measured only if no call has for twice that (a process that reaches the store
        from threads alone), so an event loop never waits here for the server."""
        if time.monotonic() - self._clock_at >= 2 * CLOCK_REFRESH_S:
            self._measure_clock()
        return time.time() + self._clock_offset

    def _measure_clock(self) -> None:
        before = time.time()
        server = self._one("SELECT extract(epoch FROM clock_timestamp())")[0]
        after = time.time()
        self._clock_offset = float(server) - (before + after) / 2
        self._clock_at = time.monotonic()

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """In a worker thread, at most POOL_SIZE at once (each then finds a connection in
        the pool without waiting): the loop serves other requests and items during the
        round trip. A cancel waits for the call to end, as a call on the loop would."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(POOL_SIZE)
        return await anyio.to_thread.run_sync(
            functools.partial(self._in_thread, fn, *args, **kwargs), limiter=self._limiter)

    def _in_thread(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if time.monotonic() - self._clock_at >= CLOCK_REFRESH_S:
            self._measure_clock()
        return fn(*args, **kwargs)


class PostgresStore(PostgresBase, BatchQueries, ItemQueries, DeliveryQueries, AccountQueries,
                    EndpointQueries, MaintenanceQueries, RetentionQueries, ViewQueries):
    """Every batch, item, delivery and key in one PostgreSQL database, shared by any
    number of processes on any number of machines."""
