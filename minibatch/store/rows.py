"""Rows as they leave and enter SQL: the tuples the runner passes around, id formats, and
the conversions from rows to the public Structs."""

from __future__ import annotations

import secrets as pysecrets
from collections.abc import Iterable
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from .. import models
from ..errors import InvalidInput
from ..models import Batch, Item, ItemError, ItemRecord, Metrics, WebhookInfo, to_datetime

ERROR_MESSAGE_CAP = 2000
BATCH_COLS = (
    "seq, id, tenant, kind, status, total, queued, running, succeeded, failed, cancelled, "
    "created_at, started_at, completed_at, metadata, max_attempts, item_timeout_s, "
    "concurrency, webhook_url, webhook_events, webhook_gone, expired, expires_at, expiring, "
    "cancel_requested_at, dialect, dialect_data"
)
decode = msgspec.json.decode
encode = models.encoder.encode
# What decoding a stored value may raise when the row holds something msgspec refuses:
# a number out of range (`1e400`, an integer over 4,300 digits: a ValidationError, which
# is a DecodeError), bytes that are not JSON, nesting too deep for it, or a column holding
# an SQL integer or real instead of JSON bytes (TypeError). Rows written by other means,
# or before the API refused such input, can hold any of these.
UNREADABLE = (msgspec.DecodeError, RecursionError, TypeError)


class BatchRow(NamedTuple):
    seq: int
    id: str
    tenant: str
    kind: str
    status: models.BatchStatus
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int
    created_at: float
    started_at: float | None
    completed_at: float | None
    metadata: bytes | None
    max_attempts: int
    item_timeout_s: float | None
    concurrency: int | None
    webhook_url: str | None
    webhook_events: str | None
    webhook_gone: int
    expired: int
    expires_at: float | None
    expiring: int
    cancel_requested_at: float | None
    dialect: models.Dialect
    dialect_data: bytes | None

    def events(self) -> list[models.EventType]:
        return decode(self.webhook_events) if self.webhook_events else []

    def data(self) -> dict[str, Any]:
        """What only the batch's dialect shows (its endpoint, window, errors, ...)."""
        return decode(self.dialect_data) if self.dialect_data else {}

    def event_type(self) -> str:
        """The type of the event this (terminal) batch's end sends, in its dialect's words:
        an OpenAI batch whose requests all failed is `completed` there, and `failed` is a
        batch whose file did not validate."""
        if self.dialect == "openai" and self.status == "failed" and self.total:
            return "batch.completed"
        return f"batch.{self.status}"


class FileRow(NamedTuple):
    id: str
    tenant: str
    filename: str | None
    bytes: int  # 0 for a generated file not yet measured
    lines: int
    created_at: float
    purpose: str | None
    batch: int | None  # the batch a generated file belongs to
    expires_at: float | None


FILE_COLS = "id, tenant, filename, bytes, lines, created_at, purpose, batch, expires_at"


# Claimed and Outcome are made once per item on the runner's path: a frozen Struct is
# made in a third of a NamedTuple's time (0.07 against 0.22 us, measured here).


class Claimed(msgspec.Struct, frozen=True):
    """A claimed item and what the runner needs to run it."""

    item: Item
    seq: int
    batch_seq: int
    max_attempts: int
    timeout_s: float | None
    claimed_at: float
    token: int  # this claim's lease token; its outcome must carry it
    expires_at: float | None = None  # the batch's: an item not started by then expires


class Outcome(msgspec.Struct, frozen=True):
    """How one attempt ended, as the completer writes it."""

    seq: int
    batch_seq: int
    token: int  # the claim's lease token
    status: str  # succeeded | failed | cancelled | expired | queued (retry)
    output: bytes | None
    error: bytes | None
    run_at: float  # for a retry


def new_id(prefix: str, sep: str = "_") -> str:
    return f"{prefix}{sep}{pysecrets.token_hex(12)}"


def item_id(seq: int) -> str:
    return f"item_{seq}"


def error_bytes(code: str, message: str) -> bytes:
    """An item error, capped; text that is not valid UTF-8 (lone surrogates from
    os.fsdecode, say) is replaced, so recording an error can never fail."""
    def utf8(text: object, cap: int) -> str:
        return str(text)[:cap].encode("utf-8", "replace").decode()

    return encode(ItemError(utf8(code, 100), utf8(message, ERROR_MESSAGE_CAP)))


def sanitize_url(url: str) -> str:
    """Drop userinfo and query values: the URL as a batch object shows it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    query = urlencode([(k, "") for k, _ in parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def items_in(raws: list[Any], start: int) -> Iterable[models.ItemIn]:
    """Items `start`, `start + 1`, ... of a submit as ItemIn, converted in one call (a
    fifth of the time of one call each). If one does not convert, each is converted as
    it is reached, so the first error by index is the one raised, whatever its kind."""
    try:
        return msgspec.convert(raws, list[models.ItemIn])
    except msgspec.ValidationError:
        return (as_item_in(raw, start + i) for i, raw in enumerate(raws))


def as_item_in(raw: Any, index: int) -> models.ItemIn:
    if isinstance(raw, models.ItemIn):
        return raw
    if not isinstance(raw, dict):
        raise InvalidInput(f"item {index} must be a dict with an 'input' key",
                           [{"field": f"items[{index}]", "message": "not an object"}])
    try:
        return msgspec.convert(raw, models.ItemIn)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"item {index}: {exc}",
                           [{"field": f"items[{index}]", "message": str(exc)}]) from None


def item_record_of(row: tuple, batch_id: str) -> ItemRecord:
    """An items row as the public item object; never raises on what the row holds.

    A stored input, output or metadata that cannot be decoded is shown as its raw text, a
    JSON string (e.g. `"1e400"`), and an unreadable error as the `unreadable_error` code
    with the raw text as its message, so the items page and item events still answer.
    `next_attempt_at` is the `run_at` of a queued item that has been tried (a retry
    waiting), and null for one never tried or no longer queued.
    """
    seq, idx, entry_id, status, inp, out, err, attempts, meta, run_at = row
    retrying = status == "queued" and attempts > 0
    return ItemRecord(
        id=item_id(seq), batch_id=batch_id, entry_id=entry_id, index=idx, status=status,
        input=readable(inp), output=None if out is None else readable(out),
        error=None if err is None else readable_error(err), attempts=attempts,
        metadata=None if meta is None else readable(meta),
        next_attempt_at=to_datetime(run_at) if retrying else None)


def readable(raw: Any) -> Any:
    """A stored JSON value decoded, or its raw text when msgspec refuses it."""
    try:
        return decode(raw)
    except UNREADABLE:
        return raw_text(raw)


def readable_error(raw: Any) -> ItemError:
    try:
        return decode(raw, type=ItemError)
    except UNREADABLE:
        return ItemError("unreadable_error", raw_text(raw))


def raw_text(raw: Any) -> str:
    """A stored value as text that cannot fail: bytes that are not UTF-8 are replaced."""
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def event_payload(row: BatchRow, event: str, now: float) -> bytes:
    """The frozen body of a batch event, in the shape of the batch's dialect: OpenAI's
    `{id: evt_…, object: event, type, created_at, data: {id}}`, or ours, the batch whole."""
    if row.dialect == "openai":
        return encode({"id": new_id("evt"), "object": "event", "type": event,
                       "created_at": int(now), "data": {"id": row.id}})
    return encode(models.Event(event, to_datetime(now), batch_struct(row)))


def batch_struct(row: BatchRow) -> Batch:
    """A batch row as the public Batch object (without its delivery summary)."""
    path = f"/v1/batches/{row.id}"
    terminal = row.status in models.BATCH_TERMINAL
    duration = None
    if row.started_at is not None and row.completed_at is not None:
        duration = int((row.completed_at - row.started_at) * 1000)
    webhook = None
    if row.webhook_url:
        webhook = WebhookInfo(url=sanitize_url(row.webhook_url), events=row.events())
    return Batch(
        id=row.id, kind=row.kind, status=row.status,
        metrics=Metrics(row.total, row.queued, row.running, row.succeeded, row.failed,
                        row.cancelled, row.expired),
        created_at=to_datetime(row.created_at), started_at=to_datetime(row.started_at),
        completed_at=to_datetime(row.completed_at), duration_ms=duration,
        metadata=decode(row.metadata) if row.metadata else {},
        expires_at=to_datetime(row.expires_at), dialect=row.dialect,
        lifecycle_status=models.LIFECYCLE[row.status],
        polling_url=path, cancel_url=None if terminal else f"{path}/cancel",
        results_url=f"{path}/results", webhook=webhook)
