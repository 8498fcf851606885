"""Tenants, API keys, signing secrets, uploaded files and idempotency keys."""

from __future__ import annotations

from typing import Any

import apsw

from ..errors import InvalidInput, NotFound, StorageUnavailable
from ..models import FileObject, to_datetime
from .base import StoreBase
from .rows import FILE_COLS, BatchRow, FileRow, new_id

KEY_TOUCH_S = 60.0  # how stale a key's last_used_at may be


class AccountQueries(StoreBase):
    def tenant_create(self, name: str, key_hash: bytes, secret_id: str, secret: str,
                      now: float, *, key_id: str, key_name: str | None = None) -> None:
        """A tenant (if new), one more API key for it, and its first secret (if none)."""
        with self._tx() as cur:
            cur.execute("INSERT INTO tenants VALUES (?,?) ON CONFLICT DO NOTHING", (name, now))
            cur.execute("INSERT INTO api_keys (key_hash, tenant, created_at, id, name)"
                        " VALUES (?,?,?,?,?)", (key_hash, name, now, key_id, key_name))
            if self._one("SELECT 1 FROM secrets WHERE tenant=? AND endpoint IS NULL",
                         (name,)) is None:
                cur.execute("INSERT INTO secrets (id, tenant, secret, created_at)"
                            " VALUES (?,?,?,?)", (secret_id, name, secret, now))

    def tenant_exists(self, name: str) -> bool:
        return self._one("SELECT 1 FROM tenants WHERE name=?", (name,)) is not None

    def tenant_by_key(self, key_hash: bytes, now: float) -> tuple[str, float] | None:
        """(tenant, last_used_at) of a key that is not revoked, or None. `last_used_at`
        is written when it is KEY_TOUCH_S old, so a caller that keeps the answer asks
        again when that much time has passed (the API keeps answers: `ReadCache`)."""
        row = self._one("SELECT tenant, last_used_at FROM api_keys WHERE key_hash=?"
                        " AND revoked_at IS NULL", (key_hash,))
        if row is None:
            return None
        tenant, used = row[0], row[1] or 0.0
        if now - used >= KEY_TOUCH_S:
            try:
                with self._tx() as cur:
                    cur.execute("UPDATE api_keys SET last_used_at=? WHERE key_hash=?",
                                (now, key_hash))
                used = now
            except StorageUnavailable:
                pass  # a full disk must not refuse a read: the next use writes it
        return tenant, used

    def keys_list(self, tenant: str | None) -> list[dict[str, Any]]:
        """Every key (of one tenant, or all), oldest first; never the key itself."""
        where, args = ("WHERE tenant=?", (tenant,)) if tenant is not None else ("", ())
        return [{"id": r[0], "tenant": r[1], "name": r[2], "created_at": to_datetime(r[3]),
                 "last_used_at": to_datetime(r[4]), "revoked_at": to_datetime(r[5])}
                for r in self.conn.execute(
                    "SELECT id, tenant, name, created_at, last_used_at, revoked_at FROM"
                    f" api_keys {where} ORDER BY created_at, rowid", args)]

    def key_revoke(self, key_id: str, now: float) -> None:
        """Revoke a key for good (NotFound if there is no such key)."""
        with self._tx() as cur:
            cur.execute("UPDATE api_keys SET revoked_at=coalesce(revoked_at, ?) WHERE id=?",
                        (now, key_id))
            if not self.conn.changes():
                raise NotFound(f"no API key {key_id!r}")

    def secrets_active(self, tenant: str, now: float, endpoint: str | None = None
                       ) -> list[tuple[str, str]]:
        """(id, secret) pairs that sign now, the primary (newest) first: the tenant's own,
        or those of one of its webhook `endpoint`s."""
        return self._all(
            "SELECT id, secret FROM secrets WHERE tenant=? AND endpoint IS ? AND"
            " (expires_at IS NULL OR expires_at > ?) ORDER BY created_at DESC, rowid DESC",
            (tenant, endpoint, now))

    def secret_rotate(self, tenant: str, secret_id: str, secret: str, overlap_s: float,
                      now: float, endpoint: str | None = None
                      ) -> tuple[str | None, float | None]:
        """Make a new primary; the previous one keeps signing for `overlap_s`, and any
        older one still in its overlap stops now: at most two secrets ever sign, so
        rotating in a loop cannot grow the signature header or the cost of signing."""
        with self._tx() as cur:
            return self._secret_rotate(cur, tenant, secret_id, secret, overlap_s, now,
                                       endpoint)

    def _secret_rotate(self, cur: apsw.Cursor, tenant: str, secret_id: str, secret: str,
                       overlap_s: float, now: float, endpoint: str | None
                       ) -> tuple[str | None, float | None]:
        active = self.secrets_active(tenant, now, endpoint)
        previous = active[0][0] if active else None
        expires = now + overlap_s if previous else None
        cur.execute("UPDATE secrets SET expires_at=? WHERE tenant=? AND endpoint IS ? AND"
                    " id IS NOT ? AND (expires_at IS NULL OR expires_at > ?)",
                    (now, tenant, endpoint, previous, now))
        cur.execute("UPDATE secrets SET expires_at=? WHERE id=?", (expires, previous))
        cur.execute("INSERT INTO secrets (id, tenant, secret, created_at, endpoint)"
                    " VALUES (?,?,?,?,?)", (secret_id, tenant, secret, now + 1e-6, endpoint))
        return previous, expires

    # -- files and idempotency ----------

    def file_begin(self, tenant: str, filename: str | None, size: int, now: float,
                   purpose: str | None = None, expires_at: float | None = None) -> str:
        """A new file row, invisible (lines < 0: no batch can use it) until finished."""
        file_id = new_id("file", "-" if purpose else "_")
        with self._tx() as cur:
            cur.execute("INSERT INTO files (id, tenant, filename, bytes, lines, created_at,"
                        " purpose, expires_at) VALUES (?,?,?,?,-1,?,?,?)",
                        (file_id, tenant, filename, size, now, purpose, expires_at))
        return file_id

    def file_lines_insert(self, file_id: str, lines: list[tuple]) -> None:
        """Add (line, entry_id, input, metadata, url, problem) rows to an unfinished file."""
        with self._tx() as cur:
            cur.executemany("INSERT INTO file_lines VALUES (?,?,?,?,?,?,?)",
                            [(file_id, *line) for line in lines])

    def file_finish(self, file_id: str, lines: int,
                    idempotency: tuple[str, bytes, int, Any] | None = None,
                    build: Any = None) -> Any:
        """Record the file's `lines` (written by `file_lines_insert`), which makes it
        usable, and store its idempotency key in the same transaction. Returns the native
        FileObject, or `build(FileRow)` when given (a dialect's file object). A native file
        with no lines is refused."""
        if lines == 0 and build is None:
            raise InvalidInput("the file has no items", [{"line": 1, "message": "empty"}])
        with self._tx() as cur:
            cur.execute("UPDATE files SET lines=? WHERE id=?", (lines, file_id))
            row = self._file_row(file_id)
            file = build(row) if build is not None else FileObject(
                id=file_id, bytes=row.bytes, lines=lines, filename=row.filename,
                created_at=to_datetime(row.created_at))
            if idempotency is not None:
                self._idempotency_put(cur, row.tenant, idempotency, file, row.created_at)
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
            cur.execute("DELETE FROM file_parts WHERE file=?", (file_id,))
            cur.execute("DELETE FROM files WHERE id=? AND lines<0", (file_id,))
            return False

    def _file_row(self, file_id: str) -> FileRow:
        return FileRow(*self._one(f"SELECT {FILE_COLS} FROM files WHERE id=?", (file_id,)))

    def file_get(self, file_id: str, tenant: str) -> FileRow:
        """A finished file of `tenant` (404 otherwise)."""
        row = self._one(f"SELECT {FILE_COLS} FROM files WHERE id=? AND tenant=? AND lines>=0",
                        (file_id, tenant))
        if row is None:
            raise NotFound(f"no file {file_id!r}")
        return FileRow(*row)

    def files_list(self, tenant: str, *, purpose: str | None, after: str | None, limit: int,
                   newest_first: bool) -> tuple[list[FileRow], bool]:
        """A page of a tenant's finished files with a purpose (the dialects' files)."""
        where, args = ["tenant=?", "lines>=0", "purpose IS NOT NULL"], [tenant]
        if purpose is not None:
            where.append("purpose=?")
            args.append(purpose)
        if after is not None:
            row = self._one("SELECT rowid FROM files WHERE id=? AND tenant=?", (after, tenant))
            if row is None:
                raise InvalidInput(f"unknown cursor {after!r}",
                                   [{"field": "after", "message": "unknown cursor"}])
            where.append("rowid<?" if newest_first else "rowid>?")
            args.append(row[0])
        order = "DESC" if newest_first else "ASC"
        rows = self._all(f"SELECT {FILE_COLS} FROM files WHERE {' AND '.join(where)}"
                         f" ORDER BY rowid {order} LIMIT ?", (*args, limit + 1))
        return [FileRow(*r) for r in rows[:limit]], len(rows) > limit

    def file_set_bytes(self, file_id: str, size: int) -> None:
        """Record the measured size of a generated file."""
        with self._tx() as cur:
            cur.execute("UPDATE files SET bytes=? WHERE id=?", (size, file_id))

    def file_part_insert(self, file_id: str, part: int, data: bytes) -> None:
        """Keep a slice of an unfinished file's bytes as uploaded (a dialect's file)."""
        with self._tx() as cur:
            cur.execute("INSERT INTO file_parts VALUES (?,?,?)", (file_id, part, data))

    def file_parts_page(self, file_id: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        """(part, bytes) of a file's upload after part `after`, in order."""
        return self._all("SELECT part, data FROM file_parts WHERE file=? AND part>?"
                         " ORDER BY part LIMIT ?", (file_id, after, limit))

    def file_problems(self, file_id: str, url: str, limit: int) -> list[tuple]:
        """Up to `limit` bad lines of a dialect's file, as (line, problem JSON or None for
        a line whose url is not `url`), in line order."""
        return self._all("SELECT line, problem FROM file_lines WHERE file=?"
                         " AND (problem IS NOT NULL OR url IS NOT ?) ORDER BY line LIMIT ?",
                         (file_id, url, limit))

    def _output_files_insert(self, cur: apsw.Cursor, row: BatchRow, now: float) -> None:
        """The output and error files of an ended batch of a dialect that has them: rows
        only (their lines are the batch's items), each made only if it has a line."""
        ended_badly = row.failed + row.cancelled + row.expired
        for purpose, lines in (("batch_output", row.succeeded), ("batch_error", ended_badly)):
            if lines:
                cur.execute("INSERT INTO files (id, tenant, filename, bytes, lines, created_at,"
                            " purpose, batch) VALUES (?,?,?,0,?,?,?,?)",
                            (new_id("file", "-"), row.tenant,
                             f"{row.id}_{purpose.removeprefix('batch_')}.jsonl", lines, now,
                             purpose, row.seq))

    def batch_files(self, batch_seq: int) -> dict[str, str]:
        """The generated files of a batch: purpose -> file id."""
        return dict(self._all("SELECT purpose, id FROM files WHERE batch=?", (batch_seq,)))

    def _idempotency_put(self, cur: apsw.Cursor, tenant: str,
                         idempotency: tuple[str, bytes, int, Any], created: Any,
                         now: float) -> None:
        key, body_hash, status, build = idempotency
        cur.execute("INSERT INTO idempotency VALUES (?,?,?,?,?,?) ON CONFLICT (tenant, key)"
                    " DO UPDATE SET body_hash=excluded.body_hash, status=excluded.status,"
                    " response=excluded.response, created_at=excluded.created_at",
                    (tenant, key, body_hash, status, build(created), now))

    def idempotency_get(self, tenant: str, key: str, since: float) -> tuple | None:
        return self._one("SELECT body_hash, status, response FROM idempotency WHERE tenant=?"
                         " AND key=? AND created_at>=?", (tenant, key, since))

    def idempotency_prune(self, before: float) -> None:
        with self._tx() as cur:
            cur.execute("DELETE FROM idempotency WHERE created_at<?", (before,))
