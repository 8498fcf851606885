"""Webhook endpoints: a tenant's standing subscriptions to the events of all its batches,
each with signing secrets of its own (rows of `secrets` that name the endpoint)."""

from __future__ import annotations

from typing import NamedTuple

from ..errors import InvalidInput, NotFound
from .base import StoreBase
from .rows import decode, encode, new_id

ENDPOINT_COLS = "seq, id, tenant, name, url, event_types, created_at, updated_at"


class EndpointRow(NamedTuple):
    seq: int
    id: str
    tenant: str
    name: str
    url: str
    event_types: str  # JSON list
    created_at: float
    updated_at: float

    def events(self) -> list[str]:
        return decode(self.event_types)


class EndpointQueries(StoreBase):
    def endpoint_create(self, tenant: str, name: str, url: str, event_types: list[str],
                        secret_id: str, secret: str, now: float) -> EndpointRow:
        """An endpoint and its first signing secret, in one transaction."""
        endpoint_id = new_id("we")
        with self._tx() as cur:
            cur.execute("INSERT INTO webhook_endpoints (id, tenant, name, url, event_types,"
                        " created_at, updated_at) VALUES (?,?,?,?,?,?,?)",
                        (endpoint_id, tenant, name, url, encode(event_types).decode(), now,
                         now))
            cur.execute("INSERT INTO secrets (id, tenant, secret, created_at, endpoint)"
                        " VALUES (?,?,?,?,?)", (secret_id, tenant, secret, now, endpoint_id))
        return self.endpoint_get(endpoint_id, tenant)

    def endpoint_get(self, endpoint_id: str, tenant: str) -> EndpointRow:
        row = self._one(f"SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE id=? AND tenant=?",
                        (endpoint_id, tenant))
        if row is None:
            raise NotFound(f"no webhook endpoint {endpoint_id!r}")
        return EndpointRow(*row)

    def endpoints_list(self, tenant: str, *, after: str | None, limit: int
                       ) -> tuple[list[EndpointRow], bool]:
        """Newest first, after the endpoint whose id is `after`; and whether more follow."""
        start = 2**62
        if after is not None:
            start = self._endpoint_cursor(after, tenant)
        rows = self._all(f"SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE tenant=?"
                         " AND seq<? ORDER BY seq DESC LIMIT ?", (tenant, start, limit + 1))
        return [EndpointRow(*r) for r in rows[:limit]], len(rows) > limit

    def _endpoint_cursor(self, endpoint_id: str, tenant: str) -> int:
        row = self._one("SELECT seq FROM webhook_endpoints WHERE id=? AND tenant=?",
                        (endpoint_id, tenant))
        if row is None:
            raise InvalidInput(f"unknown cursor {endpoint_id!r}",
                               [{"field": "after", "message": "unknown cursor"}])
        return row[0]

    def endpoint_update(self, endpoint_id: str, tenant: str, now: float, *,
                        name: str | None = None, url: str | None = None,
                        event_types: list[str] | None = None) -> EndpointRow:
        """Change what is given; `updated_at` moves only if something changed."""
        row = self.endpoint_get(endpoint_id, tenant)
        new = (name if name is not None else row.name, url if url is not None else row.url,
               encode(event_types).decode() if event_types is not None else row.event_types)
        if new != (row.name, row.url, row.event_types):
            with self._tx() as cur:
                cur.execute("UPDATE webhook_endpoints SET name=?, url=?, event_types=?,"
                            " updated_at=? WHERE seq=?", (*new, now, row.seq))
        return self.endpoint_get(endpoint_id, tenant)

    def endpoint_delete(self, endpoint_id: str, tenant: str) -> None:
        """Delete an endpoint and its secrets; its deliveries already made keep going."""
        row = self.endpoint_get(endpoint_id, tenant)
        with self._tx() as cur:
            cur.execute("DELETE FROM webhook_endpoints WHERE seq=?", (row.seq,))
            cur.execute("DELETE FROM secrets WHERE endpoint=?", (row.id,))

    def endpoint_rotate(self, endpoint_id: str, tenant: str, secret_id: str, secret: str,
                        overlap_s: float, now: float) -> EndpointRow:
        """A new primary secret for the endpoint; the old one signs for `overlap_s` more."""
        row = self.endpoint_get(endpoint_id, tenant)
        with self._tx() as cur:
            self._secret_rotate(cur, tenant, secret_id, secret, overlap_s, now, row.id)
            cur.execute("UPDATE webhook_endpoints SET updated_at=? WHERE seq=?", (now, row.seq))
        return self.endpoint_get(endpoint_id, tenant)

    def _endpoints_for(self, tenant: str, event: str) -> list[tuple[str, str]]:
        """(id, url) of the tenant's endpoints subscribed to `event`."""
        return [(r[0], r[1]) for r in self._all(
            "SELECT id, url, event_types FROM webhook_endpoints WHERE tenant=? ORDER BY seq",
            (tenant,)) if event in decode(r[2])]
