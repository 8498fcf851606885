"""API keys and idempotency keys on a real store."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from starlette.requests import Request

from minibatch.auth import Authenticator, Idempotency, create_tenant_key, hash_key
from minibatch.errors import Conflict, InvalidInput, NotFound, Unauthorized
from minibatch.store import open_store

pytestmark = pytest.mark.anyio


@pytest.mark.sqlite_only
def test_keys_are_stored_only_as_a_hash(db_path):
    store = open_store(db_path)
    out = create_tenant_key(store, "acme")
    rows = store.conn.execute("SELECT key_hash, tenant FROM api_keys").fetchall()
    assert rows == [(hash_key(out["api_key"]), "acme")]
    for path in (Path(db_path), Path(db_path + "-wal")):
        assert out["api_key"].encode() not in path.read_bytes()
    again = create_tenant_key(store, "acme")
    assert again["api_key"] != out["api_key"]
    assert again["webhook_secret"] == out["webhook_secret"]  # one secret per tenant


async def test_idempotency_survives_a_restart_and_refuses_another_body(db_path):
    store = open_store(db_path)
    idem = Idempotency(store)
    body_hash, other_hash = hashlib.sha256(b"body").digest(), hashlib.sha256(b"other").digest()
    assert await idem.stored("t", "k", body_hash) is None
    with store._tx() as cur:
        store._idempotency_put(cur, "t", ("k", body_hash, 201, lambda _: b"first"), None, 1e12)
    store.close()

    reopened = Idempotency(open_store(db_path))
    replay = await reopened.stored("t", "k", body_hash)
    assert replay[1:] == (201, b"first")
    with pytest.raises(InvalidInput):
        await reopened.stored("t", "k", other_hash)
    assert await reopened.stored("other-tenant", "k", body_hash) is None
    reopened.begin("t", "k2")
    with pytest.raises(Conflict):
        reopened.begin("t", "k2")
    reopened.end("t", "k2")
    reopened.begin("t", "k2")
    with pytest.raises(InvalidInput):
        reopened.begin("t", "x" * 256)


def test_tenant_names_are_1_to_200_characters(db_path):
    store = open_store(db_path)
    assert create_tenant_key(store, "t" * 200)["tenant"] == "t" * 200
    for bad in ("", "t" * 201):
        with pytest.raises(InvalidInput):
            create_tenant_key(store, bad)


def test_a_key_returns_the_tenants_primary_secret_even_after_a_rotation(db_path):
    store = open_store(db_path)
    first = create_tenant_key(store, "acme")
    assert first["webhook_secret"].startswith("whsec_")
    assert first["api_key"].startswith("mb_") and len(first["api_key"]) == 3 + 43
    store.secret_rotate("acme", "secret_new", "whsec_bmV3", 3600, time.time())
    assert create_tenant_key(store, "acme")["webhook_secret"] == "whsec_bmV3"


def test_idempotency_keys_are_1_to_255_characters(db_path):
    idem = Idempotency(open_store(db_path))
    idem.begin("t", "k" * 255)
    for bad in ("", "k" * 256):
        with pytest.raises(InvalidInput):
            idem.begin("t", bad)


async def test_a_key_replays_for_24_hours_and_not_after(db_path):
    store = open_store(db_path)
    idem = Idempotency(store)
    digest = hashlib.sha256(b"body").digest()
    now = time.time()
    with store._tx() as cur:
        for key, age in (("fresh", 24 * 3600 - 5), ("stale", 24 * 3600 + 5)):
            store._idempotency_put(cur, "t", (key, digest, 201, lambda _: b"x"), None,
                                   now - age)
    assert await idem.stored("t", "fresh", digest) is not None
    assert await idem.stored("t", "stale", digest) is None


def request_with(*headers: tuple[str, str]) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "query_string": b"",
                    "headers": [(k.encode(), v.encode()) for k, v in headers]})


async def test_the_key_comes_from_bearer_or_x_api_key_and_two_different_ones_are_refused(db_path):
    store = open_store(db_path)
    auth = Authenticator(store, time.time)
    a, b = create_tenant_key(store, "a")["api_key"], create_tenant_key(store, "b")["api_key"]
    assert await auth.tenant(request_with(("authorization", f"Bearer {a}"))) == "a"
    assert await auth.tenant(request_with(("authorization", f"bearer {a}"))) == "a"
    assert await auth.tenant(request_with(("x-api-key", b))) == "b"
    both = request_with(("x-api-key", a), ("authorization", f"Bearer {a}"))
    assert await auth.tenant(both) == "a"
    low, high = sorted((a, b))
    for x_api_key, bearer in ((low, high), (high, low)):
        with pytest.raises(Unauthorized):
            await auth.tenant(request_with(("x-api-key", x_api_key),
                                           ("authorization", f"Bearer {bearer}")))
    for value in (f"Bearerx {a}", f"Token {a}", f"Basic {a}", "Bearer "):
        with pytest.raises(Unauthorized):
            await auth.tenant(request_with(("authorization", value)))
    with pytest.raises(Unauthorized):
        await auth.tenant(request_with(("x-api-key", "mb_unknown")))


async def test_a_key_revoked_or_created_anywhere_counts_at_the_next_request(db_path):
    """The Authenticator keeps tenants between requests; a change through any
    connection is seen at the next one."""
    server, cli_side = open_store(db_path), open_store(db_path)
    auth = Authenticator(server, time.time)
    out = create_tenant_key(server, "acme", "deploy")
    bearer = ("authorization", f"Bearer {out['api_key']}")
    assert await auth.tenant(request_with(bearer)) == "acme"
    assert await auth.tenant(request_with(bearer)) == "acme"  # kept
    cli_side.key_revoke(out["key_id"], time.time())
    with pytest.raises(Unauthorized):
        await auth.tenant(request_with(bearer))
    unknown = "mb_" + "k" * 43
    assert await auth.tenant_of(hash_key(unknown)) is None  # kept as unknown ...
    cli_side.tenant_create("acme", hash_key(unknown), "secret_x", "whsec_x", time.time(),
                           key_id="key_new")
    assert await auth.tenant(request_with(("x-api-key", unknown))) == "acme"  # ... until made
    again = create_tenant_key(server, "acme")
    assert await auth.tenant(request_with(("x-api-key", again["api_key"]))) == "acme"
    server.key_revoke(again["key_id"], time.time())  # through the server's own connection
    with pytest.raises(Unauthorized):
        await auth.tenant(request_with(("x-api-key", again["api_key"])))
    with pytest.raises(NotFound):
        server.key_revoke("key_nope", time.time())
    server.close()
    cli_side.close()


async def test_a_key_in_steady_use_has_last_used_at_written_though_nothing_changes(db_path):
    """Kept tenants still ask the store once a minute, which writes `last_used_at`."""
    store, clock = open_store(db_path), [1000.0]
    auth = Authenticator(store, lambda: clock[0])
    out = create_tenant_key(store, "acme")

    def last_used() -> float | None:
        return store._one("SELECT last_used_at FROM api_keys WHERE id=?", (out["key_id"],))[0]

    bearer = ("authorization", f"Bearer {out['api_key']}")
    await auth.tenant(request_with(bearer))
    assert last_used() == 1000.0
    clock[0] = 1059.0
    await auth.tenant(request_with(bearer))
    assert last_used() == 1000.0
    clock[0] = 1061.0
    await auth.tenant(request_with(bearer))
    assert last_used() == 1061.0
    store.close()


def test_last_used_at_is_written_at_most_once_a_minute(db_path):
    store = open_store(db_path)
    out = create_tenant_key(store, "acme")
    digest = hash_key(out["api_key"])

    def last_used() -> float | None:
        return store._one("SELECT last_used_at FROM api_keys WHERE id=?", (out["key_id"],))[0]

    assert last_used() is None
    store.tenant_by_key(digest, 1000.0)
    assert last_used() == 1000.0
    store.tenant_by_key(digest, 1059.0)
    assert last_used() == 1000.0  # within the minute: not written
    store.tenant_by_key(digest, 1060.0)
    assert last_used() == 1060.0
    store.close()
