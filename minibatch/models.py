"""Every msgspec Struct minibatch speaks, the state names, and the shared codecs.

The same Struct is what the store returns, what the Python API hands back, what the
HTTP API encodes, what the OpenAPI document describes and what a webhook carries.

Item states:   queued -> running -> succeeded | failed | cancelled | expired
               (a failed attempt with attempts left goes back to queued, later)
Batch states:  queued -> running -> completed | failed | expired
                   \\--------\\----> cancelling -> cancelled
A terminal state never changes again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, overload

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

ItemStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]
BatchStatus = Literal["queued", "running", "completed", "failed", "cancelling", "cancelled",
                      "expired"]
Dialect = Literal["native", "openai", "anthropic"]
DeliveryStatus = Literal["pending", "succeeded", "failed"]
EventType = Literal[
    "batch.completed", "batch.failed", "batch.cancelled", "batch.expired", "item.succeeded",
    "item.failed"
]
BatchEventType = Literal["batch.completed", "batch.failed", "batch.cancelled", "batch.expired"]

ITEM_TERMINAL = ("succeeded", "failed", "cancelled", "expired")
BATCH_TERMINAL = ("completed", "failed", "cancelled", "expired")
BATCH_EVENTS: tuple[str, ...] = ("batch.completed", "batch.failed", "batch.cancelled",
                                 "batch.expired")
# The same words for every dialect's batches (`Batch.lifecycle_status`).
LIFECYCLE = {"queued": "pending", "running": "processing", "cancelling": "processing",
             "completed": "completed", "failed": "failed", "cancelled": "cancelled",
             "expired": "expired"}

encoder = msgspec.json.Encoder()

# JSON nested deeper than this is refused: msgspec's recursion guard depends on how deep
# the caller's stack already is, so a document that decodes at the API could fail to
# decode again in the runner, deeper down.
MAX_NESTING = 128


def too_deep(data: bytes, limit: int = MAX_NESTING) -> bool:
    """True if JSON `data` nests arrays/objects deeper than `limit`.

    Counting brackets first keeps the common case in C: fewer than `limit` of them
    cannot nest that deep; nor can fewer bytes, which is cheaper still to see (this runs
    twice for every item, on its input and its output)."""
    if len(data) <= limit or data.count(b"[") + data.count(b"{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


MAX_URL_LENGTH = 2048  # a webhook URL; longer ones are refused (422)
MAX_ENTRY_ID_LENGTH = 256  # a caller's entry_id
EntryId = Annotated[str, Meta(max_length=MAX_ENTRY_ID_LENGTH)]

# Upper bounds on a batch's own limits (also keeps them inside SQLite's 64-bit integers).
LIMITS = {"max_attempts": 100, "concurrency": 100_000, "item_timeout_s": 7 * 86400.0,
          "expires_after_s": 365 * 86400.0}


@overload
def to_datetime(ts: float) -> datetime: ...
@overload
def to_datetime(ts: float | None) -> datetime | None: ...
def to_datetime(ts: float | None) -> datetime | None:
    """Unix seconds as stored -> an aware UTC datetime (encoded as RFC 3339 `…Z`)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


class ItemError(Struct):
    code: str
    message: str


class Metrics(Struct):
    total: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0


class WebhookInfo(Struct):
    url: str
    events: list[EventType]
    signing_enabled: bool = True


class DeliverySummary(Struct):
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    pending: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    last_attempt_at: datetime | None = None


class FailedWebhook(Struct):
    delivery_id: str
    event: str
    attempt_count: int
    http_status: int | None
    error_message: str | None
    created_at: datetime


class Batch(Struct, kw_only=True):
    id: str
    object: Literal["batch"] = "batch"
    kind: str
    status: BatchStatus
    metrics: Metrics
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_ms: int | None = None
    metadata: dict[str, Any] = {}
    expires_at: datetime | None = None
    dialect: Dialect = "native"
    lifecycle_status: str = "pending"
    polling_url: str
    cancel_url: str | None
    results_url: str
    webhook: WebhookInfo | None = None
    # Left out of webhook payloads (UNSET fields are not encoded).
    deliveries: DeliverySummary | UnsetType = UNSET
    failed_webhooks: list[FailedWebhook] | UnsetType = UNSET

    @property
    def is_terminal(self) -> bool:
        return self.status in BATCH_TERMINAL


class Item(Struct, kw_only=True):
    """What a handler receives: one unit of work."""

    id: str
    batch_id: str
    entry_id: str | None
    index: int
    input: Any
    metadata: dict[str, Any] | None
    attempt: int


class ItemRecord(Struct, kw_only=True):
    """An item as `GET /v1/batches/{id}/items` and item webhooks show it."""

    id: str
    object: Literal["item"] = "item"
    batch_id: str
    entry_id: str | None
    index: int
    status: ItemStatus
    input: Any
    output: Any = None
    error: ItemError | None = None
    attempts: int
    metadata: dict[str, Any] | None = None
    # When a retry waits: the time its next attempt is due; null otherwise.
    next_attempt_at: datetime | None = None


class Result(Struct, kw_only=True):
    """One line of a batch's results: a terminal item."""

    id: str
    entry_id: str | None
    status: ItemStatus
    output: Any = None
    error: ItemError | None = None
    attempts: int


class Attempt(Struct, kw_only=True):
    attempt_number: int
    status_code: int | None
    response_body: str | None
    response_time_ms: int
    error_message: str | None
    is_automatic: bool
    created_at: datetime


class Delivery(Struct, kw_only=True):
    id: str
    batch_id: str
    event: str
    url: str
    payload_bytes: str
    status: DeliveryStatus
    is_automatic: bool
    signing_secret_id: str | None
    attempt_count: int
    max_attempts: int
    next_attempt_at: datetime | None
    failure_reason_code: str | None
    failure_detail: str | None
    created_at: datetime
    completed_at: datetime | None
    endpoint_id: str | None = None  # a tenant's webhook endpoint, or the batch's own webhook
    attempts: list[Attempt] = []


class Event(Struct):
    """A webhook body: encoded once when the event happens, then stored as bytes."""

    type: str
    timestamp: datetime
    data: Any


class FileObject(Struct, kw_only=True):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    lines: int
    filename: str | None
    created_at: datetime


# Request bodies: unknown fields are refused at any depth.


class ItemIn(Struct, forbid_unknown_fields=True):
    input: Any
    entry_id: EntryId | None = None
    metadata: dict[str, Any] | None = None


class ItemLine(Struct, forbid_unknown_fields=True):
    """One line of an uploaded JSONL file."""

    input: Any
    entry_id: EntryId | None = None
    metadata: dict[str, Any] | None = None


class WebhookIn(Struct, forbid_unknown_fields=True):
    url: Annotated[str, Meta(max_length=MAX_URL_LENGTH)]
    events: Annotated[list[EventType], Meta(min_length=1)] | None = None


class BatchCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    kind: str
    items: list[ItemIn] | None = None
    input_file_id: str | None = None
    webhook: WebhookIn | None = None
    metadata: dict[str, Any] | None = None
    max_attempts: Annotated[int, Meta(ge=1, le=LIMITS["max_attempts"])] | None = None
    item_timeout_s: Annotated[float, Meta(gt=0, le=LIMITS["item_timeout_s"])] | None = None
    concurrency: Annotated[int, Meta(ge=1, le=LIMITS["concurrency"])] | None = None
    expires_after_s: Annotated[float, Meta(gt=0, le=LIMITS["expires_after_s"])] | None = None


MAX_OVERLAP_S = 7 * 86400.0  # the longest an old signing secret keeps signing


class RotateSecret(Struct, forbid_unknown_fields=True):
    overlap_s: Annotated[float, Meta(ge=0, le=MAX_OVERLAP_S)] = 86400.0


class SecretRotated(Struct):
    secret_id: str
    webhook_secret: str
    previous_secret_id: str | None
    previous_expires_at: datetime | None


class WebhookEndpoint(Struct, kw_only=True):
    """A tenant's webhook endpoint: every matching event of its batches goes there."""

    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    name: str
    url: str
    event_types: list[str]
    created_at: datetime
    updated_at: datetime
    signing_secret_hint: str | None = None
    signing_secret: str | UnsetType = UNSET  # shown only when made and when rotated


class WebhookEndpointIn(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    url: Annotated[str, Meta(max_length=MAX_URL_LENGTH)]
    event_types: Annotated[list[BatchEventType], Meta(min_length=1)]


class WebhookEndpointUpdate(Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    url: Annotated[str, Meta(max_length=MAX_URL_LENGTH)] | None = None
    event_types: Annotated[list[BatchEventType], Meta(min_length=1)] | None = None


class EndpointRotate(Struct, forbid_unknown_fields=True, kw_only=True):
    keep_old_secret_active_for_24_hours: bool = False


class EndpointTest(Struct, forbid_unknown_fields=True, kw_only=True):
    event_type: BatchEventType


class EndpointTested(Struct, kw_only=True):
    event_type: str
    status_code: int
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"


class EndpointPage(Struct):
    data: list[WebhookEndpoint]
    has_more: bool
    next_cursor: str | None


class BatchPage(Struct):
    data: list[Batch]
    has_more: bool
    next_cursor: str | None


class ItemPage(Struct):
    data: list[ItemRecord]
    has_more: bool
    next_cursor: str | None


class DeliveryList(Struct):
    data: list[Delivery]
    has_more: bool
    next_cursor: str | None


class Health(Struct):
    status: str


class FieldError(Struct, omit_defaults=True):
    message: str
    field: str | None = None
    line: int | None = None


class Problem(Struct, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] = []
