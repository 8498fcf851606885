"""API keys and idempotency keys on a real store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from minibatch.auth import Idempotency, create_tenant_key, hash_key
from minibatch.errors import Conflict, InvalidInput
from minibatch.store import Store


def test_keys_are_stored_only_as_a_hash(db_path):
    store = Store(db_path)
    out = create_tenant_key(store, "acme")
    rows = store.conn.execute("SELECT key_hash, tenant FROM api_keys").fetchall()
    assert rows == [(hash_key(out["api_key"]), "acme")]
    for path in (Path(db_path), Path(db_path + "-wal")):
        assert out["api_key"].encode() not in path.read_bytes()
    again = create_tenant_key(store, "acme")
    assert again["api_key"] != out["api_key"]
    assert again["webhook_secret"] == out["webhook_secret"]  # one secret per tenant


def test_idempotency_survives_a_restart_and_refuses_another_body(db_path):
    store = Store(db_path)
    idem = Idempotency(store)
    body_hash, other_hash = hashlib.sha256(b"body").digest(), hashlib.sha256(b"other").digest()
    assert idem.stored("t", "k", body_hash) is None
    with store._tx() as cur:
        store._idempotency_put(cur, "t", ("k", body_hash, 201, lambda _: b"first"), None, 1e12)
    store.close()

    reopened = Idempotency(Store(db_path))
    replay = reopened.stored("t", "k", body_hash)
    assert replay[1:] == (201, b"first")
    with pytest.raises(InvalidInput):
        reopened.stored("t", "k", other_hash)
    assert reopened.stored("other-tenant", "k", body_hash) is None
    reopened.begin("t", "k2")
    with pytest.raises(Conflict):
        reopened.begin("t", "k2")
    reopened.end("t", "k2")
    reopened.begin("t", "k2")
    with pytest.raises(InvalidInput):
        reopened.begin("t", "x" * 256)
