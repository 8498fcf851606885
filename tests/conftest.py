"""Shared fixtures: a database in a tmp dir, a Minibatch over it, and real servers.

The suite runs against SQLite files by default and against PostgreSQL with
MINIBATCH_TEST_STORE=postgres: then every database a test asks for (`db_path`,
`database(path)`) is a fresh database on MINIBATCH_TEST_POSTGRES_URL's server, or on a
throwaway cluster this session starts (tests/postgres.py). A test of what only a SQLite
file has (its size, WAL, faults of its disk, backups) is marked `sqlite_only`.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from pathlib import Path

import pytest

import minibatch

POSTGRES = os.environ.get("MINIBATCH_TEST_STORE", "sqlite") == "postgres"
_databases = itertools.count(1)
_server: dict[str, str] = {}  # the admin URL, once the session has a server
_made: list[str] = []  # the databases this session made
_by_path: dict[str, str] = {}  # a test's database path -> its PostgreSQL database


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "sqlite_only: tests what only a SQLite file has")
    if POSTGRES:  # tests leave stores to the garbage collector, as apsw lets them
        config.addinivalue_line("filterwarnings",
                                "ignore:.*was deleted while still open:ResourceWarning")
        config.addinivalue_line("filterwarnings",
                                "ignore::pytest.PytestUnraisableExceptionWarning")


def pytest_collection_modifyitems(config, items) -> None:
    if POSTGRES:
        skip = pytest.mark.skip(reason="a SQLite file's own behaviour (MINIBATCH_TEST_STORE"
                                       "=postgres)")
        for item in items:
            if "sqlite_only" in item.keywords:
                item.add_marker(skip)


def pytest_sessionfinish(session) -> None:
    """Drop the databases this session made (on a server it was given), or stop the
    throwaway cluster it started."""
    root = _server.get("root")
    if root:
        from tests import postgres

        postgres.stop(root)
    elif _made:
        import psycopg

        with psycopg.connect(_server["url"], autocommit=True) as conn:
            for name in _made:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _admin_url() -> str:
    if "url" not in _server:
        url = os.environ.get("MINIBATCH_TEST_POSTGRES_URL")
        if not url:
            import tempfile

            from tests import postgres

            _server["root"] = tempfile.mkdtemp(prefix="minibatch-pg-")
            url = postgres.start(_server["root"])
        _server["url"] = url
    return _server["url"]


def database(path: Path | str, *, empty: bool = False) -> str:
    """The database a test keeps at `path`: that SQLite file, or under PostgreSQL a
    database of its own, made the first time the path is named (a process that starts
    again on the same path finds what the first one left). PostgreSQL databases are
    copies of one the session migrated once (a copy takes a fifth of the time the
    migrations take); `empty` makes one with no schema, for tests of the migrations."""
    if not POSTGRES or "://" in str(path):
        return str(path)
    if str(path) in _by_path:
        return _by_path[str(path)]
    template = None if empty else _template()
    url = _by_path[str(path)] = _create_database(template)
    return url


def _create_database(template: str | None) -> str:
    import psycopg

    admin = _admin_url()
    name = f"minibatch_test_{os.getpid()}_{next(_databases)}_{secrets.token_hex(3)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    _made.append(name)
    return admin.rsplit("/", 1)[0] + "/" + name


def _template() -> str:
    """The session's migrated database that every other one is copied from."""
    if "template" not in _server:
        from minibatch.store import open_store

        url = _create_database(None)
        open_store(url).close()  # applies the migrations; no connection is left open
        _server["template"] = url.rsplit("/", 1)[1]
    return _server["template"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def db_path(tmp_path) -> str:
    return database(tmp_path / "jobs.db")


@pytest.fixture
def mb(db_path):
    instance = minibatch.Minibatch(db_path, lease_s=5, retry_base_s=0.01, poll_interval_s=0.02)
    yield instance
    instance.close()


class ServerThread:
    """A real uvicorn server for one Minibatch, on 127.0.0.1 and a free port, run in a
    thread with its own event loop, so tests talk to it over real HTTP, behind the same
    limits as `minibatch serve` (`minibatch.server`)."""

    def __init__(self, db_path: str, **options) -> None:
        import threading

        from minibatch.kinds import register_builtin_kinds
        from tests.receiver import free_port

        options.setdefault("allow_private_webhooks", True)
        options.setdefault("poll_interval_s", 0.02)
        self.mb = minibatch.Minibatch(database(db_path), **options)
        register_builtin_kinds(self.mb)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import anyio
        import uvicorn

        from minibatch.server import server_config

        async def main() -> None:
            config = server_config(self.mb, "127.0.0.1", self.port, log_level="warning")
            self.server = uvicorn.Server(config)
            async with self.mb:
                await self.server.serve()

        anyio.run(main)

    def start(self) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.monotonic() + 10
        while not (self.server and self.server.started):
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def key(self, tenant: str) -> str:
        from minibatch.auth import create_tenant_key

        return create_tenant_key(self.mb.store, tenant)["api_key"]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.mb.close()

    def stored(self, tenant: str) -> tuple[int, int, int]:
        """What `tenant` has stored: its files, their lines, its batches. Lines of no file
        count too, whoever wrote them: a refused upload must leave neither."""
        one = self.mb.store._one
        return (one("SELECT count(*) FROM files WHERE tenant=?", (tenant,))[0],
                one("SELECT count(*) FROM file_lines WHERE file IN"
                    " (SELECT id FROM files WHERE tenant=?)"
                    " OR file NOT IN (SELECT id FROM files)", (tenant,))[0],
                one("SELECT count(*) FROM batches WHERE tenant=?", (tenant,))[0])


SERVER_OPTIONS = {"max_json_bytes": 1024 * 1024, "max_file_bytes": 2 * 1024 * 1024,
                  "webhook_retry_schedule": "0,0.05,0.05"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server and database per test module: a test gets its own tenant (`tenant`,
    `client`) and sees only that tenant's batches, files, deliveries and secrets. A test
    that needs a server to itself (global counts, metrics, patched settings) takes
    `fresh_server` or builds its own `ServerThread`."""
    srv = ServerThread(str(tmp_path_factory.mktemp("server") / "jobs.db"), **SERVER_OPTIONS)
    yield srv.start()
    srv.stop()


@pytest.fixture
def fresh_server(db_path):
    """A server and database of its own for one test, with the settings of `server`."""
    srv = ServerThread(db_path, **SERVER_OPTIONS)
    yield srv.start()
    srv.stop()


_tenant_numbers = itertools.count(1)


@pytest.fixture
def tenant(request) -> str:
    """A tenant name no other test uses (the counter keeps it unique, the name says whose)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    return f"t{next(_tenant_numbers)}-{name}"[:180]  # room for a suffix: 200 at most


def tenant_client(srv: ServerThread, tenant: str):
    import httpx

    return httpx.Client(base_url=srv.url, timeout=10,
                        headers={"Authorization": f"Bearer {srv.key(tenant)}"})


@pytest.fixture
def client(server, tenant):
    with tenant_client(server, tenant) as c:
        yield c
