"""Uploaded JSONL files: every line validated off the event loop, stored in short
transactions, so a 100 MiB upload never freezes other requests, items or deliveries.

A file's lines are written chunk by chunk under a file row that stays invisible (no
lines counted) until the last chunk is in; a file with a bad line is deleted whole and
answered 422 naming every bad line, so bad input still leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator
from typing import Any

import anyio
import msgspec

from . import models
from .errors import InvalidInput, MinibatchError
from .models import ItemLine, too_deep
from .store import Store

CHUNK_LINES = 5000  # lines validated per thread hop and written per transaction
CHUNK_BYTES = 1024 * 1024
MAX_LINE_ERRORS = 100  # listed in the 422; all are counted
_encode = models.encoder.encode
_decode_line = msgspec.json.Decoder(ItemLine).decode


class LineChecker:
    """Validates JSONL lines, remembering entry_ids across chunks and counting errors."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.errors: list[dict] = []
        self.bad_lines = 0

    def check(self, lines: list[tuple[int, bytes]]) -> list[tuple]:
        """(line, entry_id, input, metadata, url, problem) for each good line; bad ones
        are recorded (url and problem are for dialects' files, None here).

        Input and metadata are decoded whole, so anything the runner could not decode
        (`1e400`, a 5,000-digit integer, invalid UTF-8) is refused here, at the door."""
        good = []
        for number, raw in lines:
            try:
                line = _decode_line(raw)
                item = _encode(line.input)
                meta = None if line.metadata is None else _encode(line.metadata)
            except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
                self._error(number, "nested too deeply" if isinstance(exc, RecursionError)
                            else str(exc))
                continue
            if too_deep(item) or (meta is not None and too_deep(meta)):
                self._error(number, f"nested deeper than {models.MAX_NESTING} levels")
            elif line.entry_id is not None and line.entry_id in self.seen:
                self._error(number, f"duplicate entry_id {line.entry_id!r}")
            else:
                if line.entry_id is not None:
                    self.seen.add(line.entry_id)
                good.append((number, line.entry_id, item, meta, None, None))
        return good

    def _error(self, line: int, message: str) -> None:
        self.bad_lines += 1
        if len(self.errors) < MAX_LINE_ERRORS:
            self.errors.append({"line": line, "message": message})


def numbered_chunks(data: bytes) -> Iterator[list[tuple[int, bytes]]]:
    """Non-blank lines numbered from 1, in chunks of at most CHUNK_LINES lines or about
    CHUNK_BYTES bytes (blank lines are skipped but still counted)."""
    chunk: list[tuple[int, bytes]] = []
    size = 0
    for number, raw in enumerate(io.BytesIO(data), start=1):
        if not raw.strip():
            continue
        chunk.append((number, raw))
        size += len(raw)
        if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


async def body_digest(data: bytes) -> bytes:
    """SHA-256 of a body, in a thread: 100 MiB would hold the loop for a fifth of a second."""
    return await anyio.to_thread.run_sync(lambda: hashlib.sha256(data).digest())


async def store_file(store: Store, tenant: str, filename: str | None, data: bytes,
                     now: float, idempotency: tuple[str, bytes, int, Any] | None = None, *,
                     checker: Any = None, purpose: str | None = None,
                     expires_at: float | None = None, build: Any = None) -> Any:
    """Validate and store a JSONL file; InvalidInput (and nothing stored) on a bad line.

    `checker` reads the lines (a native LineChecker by default; a dialect's keeps every
    line and marks the bad ones, for the batch that uses the file to report); `purpose`,
    `expires_at` and `build` (FileRow -> the dialect's file object) are a dialect's; a
    dialect's file also keeps its bytes as uploaded, for its download.
    Each chunk is validated in a worker thread and written through `store.call` in its
    own short transaction (on the loop for SQLite, in the store's thread for
    PostgreSQL), so neither the parse nor the write holds the loop for long."""
    checker = checker or LineChecker()
    chunks = numbered_chunks(data)

    def next_chunk() -> list[tuple] | None:
        lines = next(chunks, None)
        return None if lines is None else checker.check(lines)

    file_id = await store.call(store.file_begin, tenant, filename, len(data), now, purpose,
                               expires_at)
    written = 0
    try:
        while (good := await anyio.to_thread.run_sync(next_chunk)) is not None:
            if not checker.bad_lines:  # past the first bad line, only errors are gathered
                await store.call(store.file_lines_insert, file_id, good)
                written += len(good)
        if checker.bad_lines:
            raise InvalidInput(
                f"{checker.bad_lines} bad line(s) in the file (the first"
                f" {len(checker.errors)} are listed)", checker.errors)
        if purpose is not None:
            for part, start in enumerate(range(0, len(data), CHUNK_BYTES)):
                await store.call(store.file_part_insert, file_id, part,
                                 data[start:start + CHUNK_BYTES])
                await anyio.sleep(0)
        # `build` and the key's builder run inside its transaction, in the store's thread
        # on PostgreSQL: they must be plain code that calls the store synchronously.
        return await store.call(store.file_finish, file_id, written, idempotency, build)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await discard(store, file_id)
        raise


async def discard(store: Store, file_id: str) -> None:
    """Delete an unfinished file a chunk at a time. Unfinished, it is invisible anyway:
    a discard that fails (the disk is full) leaves only that behind."""
    with contextlib.suppress(MinibatchError):
        while await store.call(store.file_discard, file_id, CHUNK_LINES):
            await anyio.sleep(0)
