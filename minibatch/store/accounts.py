"""Tenants, API keys, signing secrets, uploaded files and idempotency keys."""

from __future__ import annotations

from typing import Any

import apsw

from ..errors import InvalidInput
from ..models import FileObject, to_datetime
from .base import StoreBase
from .rows import (
    new_id,
)


class AccountQueries(StoreBase):
    def tenant_create(self, name: str, key_hash: bytes, secret_id: str, secret: str,
                      now: float) -> None:
        """A tenant (if new), one more API key for it, and its first secret (if none)."""
        with self._tx() as cur:
            cur.execute("INSERT OR IGNORE INTO tenants VALUES (?,?)", (name, now))
            cur.execute("INSERT INTO api_keys VALUES (?,?,?)", (key_hash, name, now))
            if self._one("SELECT 1 FROM secrets WHERE tenant=?", (name,)) is None:
                cur.execute("INSERT INTO secrets VALUES (?,?,?,?,NULL)",
                            (secret_id, name, secret, now))

    def tenant_exists(self, name: str) -> bool:
        return self._one("SELECT 1 FROM tenants WHERE name=?", (name,)) is not None

    def tenant_by_key(self, key_hash: bytes) -> str | None:
        row = self._one("SELECT tenant FROM api_keys WHERE key_hash=?", (key_hash,))
        return row[0] if row else None

    def secrets_active(self, tenant: str, now: float) -> list[tuple[str, str]]:
        """(id, secret) pairs that sign now, the primary (newest) first."""
        return self._all(
            "SELECT id, secret FROM secrets WHERE tenant=? AND (expires_at IS NULL OR"
            " expires_at > ?) ORDER BY created_at DESC, rowid DESC", (tenant, now))

    def secret_rotate(self, tenant: str, secret_id: str, secret: str, overlap_s: float,
                      now: float) -> tuple[str | None, float | None]:
        """Make a new primary; the previous one keeps signing for `overlap_s`, and any
        older one still in its overlap stops now: at most two secrets ever sign, so
        rotating in a loop cannot grow the signature header or the cost of signing."""
        with self._tx() as cur:
            active = self.secrets_active(tenant, now)
            previous = active[0][0] if active else None
            expires = now + overlap_s if previous else None
            cur.execute("UPDATE secrets SET expires_at=? WHERE tenant=? AND id<>? AND"
                        " (expires_at IS NULL OR expires_at > ?)", (now, tenant, previous, now))
            cur.execute("UPDATE secrets SET expires_at=? WHERE id=?", (expires, previous))
            cur.execute("INSERT INTO secrets VALUES (?,?,?,?,NULL)", (secret_id, tenant, secret,
                                                                     now + 1e-6))
        return previous, expires

    # -- files and idempotency ----------

    def file_begin(self, tenant: str, filename: str | None, size: int, now: float) -> str:
        """A new file row with no lines: invisible (no batch can use it) until finished."""
        file_id = new_id("file")
        with self._tx() as cur:
            cur.execute("INSERT INTO files VALUES (?,?,?,?,0,?)",
                        (file_id, tenant, filename, size, now))
        return file_id

    def file_lines_insert(self, file_id: str, lines: list[tuple]) -> None:
        """Add (line, entry_id, input, metadata) rows to an unfinished file."""
        with self._tx() as cur:
            cur.executemany("INSERT INTO file_lines VALUES (?,?,?,?,?)",
                            [(file_id, *line) for line in lines])

    def file_finish(self, file_id: str, lines: int,
                    idempotency: tuple[str, bytes, int, Any] | None = None) -> FileObject:
        """Record the file's `lines` (written by `file_lines_insert`), which makes it
        usable, and store its idempotency key in the same transaction. An empty file is
        refused."""
        if lines == 0:
            raise InvalidInput("the file has no items", [{"line": 1, "message": "empty"}])
        with self._tx() as cur:
            cur.execute("UPDATE files SET lines=? WHERE id=?", (lines, file_id))
            tenant, filename, size, created = self._one(
                "SELECT tenant, filename, bytes, created_at FROM files WHERE id=?", (file_id,))
            file = FileObject(id=file_id, bytes=size, lines=lines, filename=filename,
                              created_at=to_datetime(created))
            if idempotency is not None:
                self._idempotency_put(cur, tenant, idempotency, file, created)
        return file

    def file_discard(self, file_id: str, chunk: int) -> bool:
        """Delete up to `chunk` lines of an unfinished file, and the file once none are
        left; True while lines remain (a transaction per chunk keeps each one short)."""
        with self._tx() as cur:
            cur.execute("DELETE FROM file_lines WHERE file=?1 AND line IN"
                        " (SELECT line FROM file_lines WHERE file=?1 LIMIT ?2)",
                        (file_id, chunk))
            if self.conn.changes() == chunk:
                return True
            cur.execute("DELETE FROM files WHERE id=? AND lines=0", (file_id,))
            return False

    def _idempotency_put(self, cur: apsw.Cursor, tenant: str,
                         idempotency: tuple[str, bytes, int, Any], created: Any,
                         now: float) -> None:
        key, body_hash, status, build = idempotency
        cur.execute("INSERT OR REPLACE INTO idempotency VALUES (?,?,?,?,?,?)",
                    (tenant, key, body_hash, status, build(created), now))

    def idempotency_get(self, tenant: str, key: str, since: float) -> tuple | None:
        return self._one("SELECT body_hash, status, response FROM idempotency WHERE tenant=?"
                         " AND key=? AND created_at>=?", (tenant, key, since))

    def idempotency_prune(self, before: float) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM idempotency WHERE created_at<?", (before,))
