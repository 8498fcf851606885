"""The Anthropic dialect at `/anthropic`: Message Batches in Anthropic's shapes, so the
unchanged `anthropic` SDK drives minibatch (its paths carry `/v1`, so its base URL is
`http://HOST:PORT/anthropic`).

A message batch is a native batch (id `msgbatch_…`, same store, same engine) of the kind
`anthropic:/v1/messages` whose items are the requests' `params` (entry_id = custom_id).
Its processing status and counts are read off the native row:

    native queued | running   -> in_progress      queued + running -> processing
    native cancelling         -> canceling        succeeded, failed -> errored,
    any terminal status       -> ended            cancelled -> canceled, expired

Requests are validated whole before anything is written: a bad one is a 400 naming it.
Results are the batch's items, one JSON line each in request order, streamed.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import models
from .api import Api, decode_json, dialect_app, limit_arg
from .errors import BadRequest, IdempotencyMismatch, InvalidInput, MinibatchError, NotFound
from .models import to_datetime
from .store import BatchRow, readable_error
from .upstream import ANTHROPIC_KIND

JSON = "application/json"
MAX_REQUESTS = 100_000
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
RESULT_PAGE = 1000
_encode = models.encoder.encode
_decode = msgspec.json.decode


# -- objects ----------


class RequestCounts(msgspec.Struct):
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int


class MessageBatch(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["message_batch"] = "message_batch"
    processing_status: str
    request_counts: RequestCounts
    created_at: datetime
    expires_at: datetime | None
    ended_at: datetime | None
    cancel_initiated_at: datetime | None
    archived_at: None = None
    results_url: str | None


class Page(msgspec.Struct):
    data: list[MessageBatch]
    has_more: bool
    first_id: str | None
    last_id: str | None


class RequestIn(msgspec.Struct, forbid_unknown_fields=True):
    custom_id: str
    params: dict[str, Any]


class CreateIn(msgspec.Struct, forbid_unknown_fields=True):
    requests: Annotated[list[RequestIn], msgspec.Meta(min_length=1,
                                                      max_length=MAX_REQUESTS)]


def message_batch(row: BatchRow) -> MessageBatch:
    ended = row.status in models.BATCH_TERMINAL
    status = "ended" if ended else "canceling" if row.status == "cancelling" else "in_progress"
    return MessageBatch(
        id=row.id, processing_status=status,
        request_counts=RequestCounts(row.queued + row.running, row.succeeded, row.failed,
                                     row.cancelled, row.expired),
        created_at=to_datetime(row.created_at), expires_at=to_datetime(row.expires_at),
        ended_at=to_datetime(row.completed_at),
        cancel_initiated_at=to_datetime(row.cancel_requested_at),
        # A path the SDK joins to its base URL (the dialect's prefix comes with it).
        results_url=f"/v1/messages/batches/{row.id}/results" if ended else None)


def _encode_batch(row: BatchRow) -> bytes:
    return _encode(message_batch(row))


# -- result lines ----------


class _Envelope(msgspec.Struct):
    """A stored response envelope, its body passed through undecoded."""

    status_code: int
    body: msgspec.Raw


class _Line(msgspec.Struct):
    custom_id: str | None
    result: Any


# An upstream's status, as the error type Anthropic gives it.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 529: "overloaded_error"}


def result_line(entry_id: str | None, status: str, output: bytes | None,
                error: bytes | None) -> bytes:
    """One results line, from an item's result row."""
    if status == "succeeded" and output is not None:
        result: Any = {"type": "succeeded", "message": _decode(output, type=_Envelope).body}
    elif status == "cancelled":
        result = {"type": "canceled"}
    elif status == "expired":
        result = {"type": "expired"}
    else:
        result = {"type": "errored", "error": {"type": "error",
                                               "error": _error_of(output, error)}}
    return _encode(_Line(entry_id, result)) + b"\n"


def _error_of(output: bytes | None, error: bytes | None) -> dict[str, str]:
    """The nested error of a failed request: the upstream's own type and message when it
    answered (Anthropic's or OpenAI's error body), else the item's error."""
    if output is not None:
        answer = _decode(output)
        status = answer.get("status_code", 500) if isinstance(answer, dict) else 500
        body = answer.get("body") if isinstance(answer, dict) else None
        body = body if isinstance(body, dict) else {}
        inner = body.get("error")
        kind, message = ERROR_TYPES.get(status, "api_error"), f"upstream HTTP {status}"
        if isinstance(inner, dict):
            if body.get("type") == "error" and isinstance(inner.get("type"), str):
                kind = inner["type"]  # an Anthropic upstream's own error body
            message = str(inner.get("message") or message)
        return {"type": kind, "message": message}
    item_error = readable_error(error) if error is not None else models.ItemError(
        "api_error", "the request failed")
    kind = item_error.code if item_error.code == "invalid_request_error" else "api_error"
    return {"type": kind, "message": item_error.message}


# -- routes ----------


class AnthropicApi:
    """The `/anthropic/v1/messages/batches` routes over the native Api's instance."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.mb = api.mb

    async def create(self, request: Request, tenant: str) -> Response:
        async def read() -> tuple[bytes, CreateIn]:
            body = await self.api.json_body(request)
            spec = decode_json(body, CreateIn)
            _check_custom_ids(spec.requests)
            return body, spec

        async def create(idem: tuple | None, spec: CreateIn) -> Response:
            if self.mb.registry.get(ANTHROPIC_KIND) is None:
                raise BadRequest("no upstream or handler runs message batches on this server")
            batch = await self.mb.submit(
                ANTHROPIC_KIND, ({"input": r.params, "entry_id": r.custom_id}
                                 for r in spec.requests),
                tenant=tenant, idempotency=idem, dialect="anthropic",
                expires_after_s=self.mb.settings.completion_window_s, id_prefix="msgbatch")
            row = await self.mb.store.call(self.mb.store.batch_row, batch.id, tenant)
            return Response(_encode_batch(row), media_type=JSON)

        return await self.api.idempotent(request, tenant, read, create, 200, _encode_batch)

    async def list(self, request: Request, tenant: str) -> Response:
        q = request.query_params
        store = self.mb.store
        rows, more = await store.call(
            store.batch_rows_list, tenant, dialect="anthropic", after=q.get("after_id"),
            before=q.get("before_id"), limit=limit_arg(q.get("limit"), 20, 1000))
        data = [message_batch(r) for r in rows]
        return _json(Page(data, more, data[0].id if data else None,
                          data[-1].id if data else None))

    async def retrieve(self, request: Request, tenant: str) -> Response:
        row = await self.mb.store.call(self._row, request.path_params["batch_id"], tenant)
        return _json(message_batch(row))

    async def cancel(self, request: Request, tenant: str) -> Response:
        store = self.mb.store
        row = await store.call(self._row, request.path_params["batch_id"], tenant)
        if row.status in models.BATCH_TERMINAL:
            raise BadRequest(f"message batch {row.id} has already ended")
        await self.mb.cancel(row.id, tenant=tenant)
        return _json(message_batch(await store.call(store.batch_row, row.id, tenant)))

    async def delete(self, request: Request, tenant: str) -> Response:
        batch_id = request.path_params["batch_id"]

        def delete() -> None:  # the check and the delete: one call
            row = self._row(batch_id, tenant)
            if row.status not in models.BATCH_TERMINAL:
                raise BadRequest(f"message batch {row.id} is still in progress: cancel it,"
                                 " or wait for it to end, before deleting it")
            self.mb.store.batch_delete(row.id, tenant, self.mb.now())

        await self.mb.store.call(delete)
        return _json({"id": batch_id, "type": "message_batch_deleted"})

    async def results(self, request: Request, tenant: str) -> Response:
        row = await self.mb.store.call(self._row, request.path_params["batch_id"], tenant)
        if row.status not in models.BATCH_TERMINAL:
            raise BadRequest(f"message batch {row.id} has not ended: no results yet")
        return StreamingResponse(self._lines(row.seq), media_type="application/binary")

    async def _lines(self, batch_seq: int) -> AsyncIterator[bytes]:
        """The results lines, a page per `call`."""
        store, after = self.mb.store, -1
        while page := await store.call(store.results_page, batch_seq, after, RESULT_PAGE):
            yield b"".join(result_line(entry_id, status, out, err)
                           for _, _, entry_id, status, out, err, _ in page)
            after = page[-1][0]

    def _row(self, batch_id: str, tenant: str) -> BatchRow:
        """The tenant's message batch (a store read: run it through `call`)."""
        try:
            row = self.mb.store.batch_row(batch_id, tenant)
        except NotFound:
            row = None
        if row is None or row.dialect != "anthropic":
            raise NotFound(f"message batch {batch_id!r} not found")
        return row


def _check_custom_ids(requests: list[RequestIn]) -> None:
    seen: set[str] = set()
    for n, r in enumerate(requests):
        field = f"requests[{n}].custom_id"
        if not CUSTOM_ID.fullmatch(r.custom_id):
            raise InvalidInput(f"{field} must match ^[a-zA-Z0-9_-]{{1,64}}$",
                               [{"field": field, "message": "bad custom_id"}])
        if r.custom_id in seen:
            raise InvalidInput(f"{field} {r.custom_id!r} is used by an earlier request",
                               [{"field": field, "message": "duplicate"}])
        seen.add(r.custom_id)


def _json(obj: Any) -> Response:
    return Response(_encode(obj), media_type=JSON)


# -- errors in Anthropic's shape ----------

_TYPES = {400: "invalid_request_error", 401: "authentication_error",
          404: "not_found_error", 409: "invalid_request_error",
          413: "request_too_large", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "api_error", 500: "api_error"}


def anthropic_error(exc: MinibatchError) -> Response:
    """Anthropic's error body; bad input is a 400 (a reused Idempotency-Key stays 422)."""
    status = 400 if exc.status == 422 and not isinstance(exc, IdempotencyMismatch) else (
        exc.status)
    body = {"type": "error", "error": {"type": _TYPES.get(status, "api_error"),
                                       "message": exc.detail}}
    return Response(_encode(body), status_code=status, media_type=JSON, headers=exc.headers)


ROUTES = [
    ("POST", "/v1/messages/batches", "create"), ("GET", "/v1/messages/batches", "list"),
    ("GET", "/v1/messages/batches/{batch_id}", "retrieve"),
    ("POST", "/v1/messages/batches/{batch_id}/cancel", "cancel"),
    ("DELETE", "/v1/messages/batches/{batch_id}", "delete"),
    ("GET", "/v1/messages/batches/{batch_id}/results", "results"),
]


def create_app(api: Api) -> Starlette:
    """The dialect, to mount at /anthropic."""
    return dialect_app(api, AnthropicApi(api), ROUTES, anthropic_error)
