"""API keys, the tenant of a request, and idempotency keys.

Keys are random and stored only as their SHA-256 digest; a request's key is hashed and
looked up by digest, so neither the lookup's timing nor the database reveals a key.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

from starlette.requests import Request

from .errors import Conflict, IdempotencyMismatch, InvalidInput, TooManyRequests, Unauthorized
from .readcache import ReadCache
from .signing import new_secret
from .store import Store, new_id
from .store.accounts import KEY_TOUCH_S

KEY_PREFIX = "mb_"
IDEMPOTENCY_WINDOW_S = 24 * 3600.0
IDEMPOTENCY_KEY_MAX = 255


def hash_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def create_tenant_key(store: Store, tenant: str, name: str | None = None) -> dict[str, str]:
    """A new API key for `tenant` (created if new), and the tenant's signing secret."""
    if not tenant or len(tenant) > 200:
        raise InvalidInput("tenant must be 1-200 characters",
                           [{"field": "tenant", "message": "bad length"}])
    if name is not None and len(name) > 200:
        raise InvalidInput("a key's name must be at most 200 characters",
                           [{"field": "name", "message": "too long"}])
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    now, key_id = time.time(), new_id("key")
    store.tenant_create(tenant, hash_key(api_key), new_id("secret"), new_secret(), now,
                        key_id=key_id, key_name=name)
    secret = store.secrets_active(tenant, now)[0][1]
    return {"tenant": tenant, "api_key": api_key, "webhook_secret": secret, "key_id": key_id}


class RateLimit:
    """A token bucket per key: `rate` requests a second, bursts of up to one second's."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.buckets: dict[bytes, list[float]] = {}  # key digest -> [tokens, at]

    def wait(self, digest: bytes, now: float) -> float:
        """0 if this request may go now (and it takes a token), else the seconds until
        one is free."""
        bucket = self.buckets.get(digest)
        if bucket is None:
            bucket = self.buckets[digest] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate


class Authenticator:
    """Finds the tenant of a request from `Authorization: Bearer` or `x-api-key`, and
    holds each key to `rate_limit` requests a second (429 beyond).

    A key's tenant is kept in the request's ReadCache, which this refreshes at every
    lookup, so a key revoked anywhere is refused at its next request; the store is
    asked again when the key's `last_used_at` is KEY_TOUCH_S old, and writes it. On
    SQLite a kept key costs no store call at all, and a lookup runs at once (`call`);
    on PostgreSQL, whose version moves at every refresh, each request looks its key up
    in a worker thread."""

    def __init__(self, store: Store, now: Callable[[], float],
                 rate_limit: float | None = None, reads: ReadCache | None = None) -> None:
        self.store = store
        self.now = now
        self.limit = RateLimit(rate_limit) if rate_limit else None
        self.reads = reads if reads is not None else ReadCache(store)

    async def tenant(self, request: Request) -> str:
        key, authorization = _credentials(request.scope["headers"])
        scheme, _, value = authorization.partition(" ")
        bearer = value.strip() if scheme.lower() == "bearer" else None
        if key is not None and bearer is not None and key != bearer:
            raise Unauthorized("Authorization and x-api-key name different keys")
        key = key if key is not None else bearer
        if not key:
            raise Unauthorized("missing API key: send Authorization: Bearer <key> or x-api-key")
        digest = hash_key(key)
        tenant = await self.tenant_of(digest)
        if tenant is None:
            raise Unauthorized("unknown or revoked API key")
        if self.limit is not None and (wait := self.limit.wait(digest, time.monotonic())):
            raise TooManyRequests(f"over {self.limit.rate:g} requests a second for this key"
                                  " (rate_limit)", wait)
        return tenant

    async def tenant_of(self, digest: bytes) -> str | None:
        """The tenant of the key with this digest, or None if it is unknown or revoked."""
        self.reads.refresh()
        known = self.reads.get(("key", digest))  # (tenant or None, last_used_at)
        if known is None or self.now() - known[1] >= KEY_TOUCH_S:
            known = await self.reads.read(("key", digest), lambda: self._look_up(digest))
        return known[0]

    def _look_up(self, digest: bytes) -> tuple[str | None, float]:
        # In the store's thread: the clock is read there too, so a PostgreSQL clock due
        # for measuring is measured off the loop (`call` does it first).
        now = self.now()
        return self.store.tenant_by_key(digest, now) or (None, now)


def _credentials(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str]:
    """The first `x-api-key` (or None) and `Authorization` (or "") of the raw headers, in
    one pass: every request is authenticated, and Starlette's header mapping scans the
    list once per name."""
    key, authorization = None, None
    for name, value in headers:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"x-api-key" and key is None:
            key = value.decode("latin-1")
    return key, authorization or ""


class Idempotency:
    """IETF Idempotency-Key: replay the first 201 for the same key and body for 24 h.

    The key is stored in the same transaction as what the request created. A request
    holds its key from `begin` to `end`: meanwhile the same key is a 409. A reused key
    with another body is a 422.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.in_flight: set[tuple[str, str]] = set()

    def begin(self, tenant: str, key: str) -> None:
        """Mark the key in flight: 409 if it already is."""
        if not key or len(key) > IDEMPOTENCY_KEY_MAX:
            raise InvalidInput("Idempotency-Key must be 1-255 characters",
                               [{"field": "Idempotency-Key", "message": "bad length"}])
        if (tenant, key) in self.in_flight:
            raise Conflict("a request with this Idempotency-Key is still in flight")
        self.in_flight.add((tenant, key))

    def end(self, tenant: str, key: str) -> None:
        self.in_flight.discard((tenant, key))

    async def stored(self, tenant: str, key: str, body_hash: bytes
                     ) -> tuple[bytes, int, bytes] | None:
        """The stored (body_hash, status, response) to replay, or None to go ahead;
        `body_hash` is the SHA-256 of what the key covers, and another one is a 422."""
        stored = await self.store.call(self.store.idempotency_get, tenant, key,
                                       time.time() - IDEMPOTENCY_WINDOW_S)
        if stored is not None and stored[0] != body_hash:
            raise IdempotencyMismatch(
                "this Idempotency-Key was used with a different request body",
                [{"field": "Idempotency-Key", "message": "reused with another body"}])
        return stored
