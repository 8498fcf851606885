"""The OpenAI dialect at `/openai/v1`: files, batches and webhook endpoints in OpenAI's
shapes, so the unchanged `openai` SDK drives minibatch.

An OpenAI batch is a native batch (same id, same store, same engine) of the kind
`openai:<endpoint>` whose items are the bodies of its file's lines (entry_id = custom_id).
Its OpenAI status, counts, times and files are read off the native row:

    native queued | running            -> in_progress
    native completed | failed (items)  -> completed (finalizing_at = completed_at)
    native failed with no items        -> failed (the file did not validate: `errors`)
    cancelling / cancelled / expired   -> the same words

A file is validated when a batch is made of it, inside the create request: every bad
line is named in the batch's `errors` and the batch ends `failed` with nothing run, so
the create answers a batch already `in_progress` or `failed`. The output and error files
are the batch's items, rendered line by line when downloaded.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import models
from .api import Api, decode_json, dialect_app, limit_arg
from .errors import BadRequest, IdempotencyMismatch, InvalidInput, MinibatchError, NotFound
from .files import store_file
from .store import BatchRow, EndpointRow, FileRow, readable_error
from .upstream import OPENAI_ENDPOINTS, openai_kind

JSON = "application/json"
WINDOWS = {"24h"}
MAX_LISTED_ERRORS = 1000  # bad lines named in a failed batch's `errors` (all are counted)
RESULT_PAGE = 1000
BATCH_EVENT_TYPES = ("batch.completed", "batch.failed", "batch.cancelled", "batch.expired")
_encode = models.encoder.encode
_decode = msgspec.json.decode


# -- objects ----------


class FileOut(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str | None
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class RequestCounts(msgspec.Struct):
    total: int
    completed: int
    failed: int


class BatchErrorData(msgspec.Struct):
    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(msgspec.Struct):
    data: list[BatchErrorData]
    object: Literal["list"] = "list"


class BatchOut(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, Any] | None


class Page(msgspec.Struct):
    data: list[Any]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class EndpointOut(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    name: str
    url: str
    event_types: list[str]
    created_at: int
    updated_at: int
    signing_secret_hint: str | None = None
    signing_secret: str | msgspec.UnsetType = msgspec.UNSET  # only when made or rotated


# -- request bodies ----------


class BatchIn(msgspec.Struct, kw_only=True):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None


EventTypes = list[str]


class EndpointIn(msgspec.Struct, kw_only=True):
    name: str
    url: str
    event_types: EventTypes


class EndpointUpdate(msgspec.Struct, kw_only=True):
    name: str | None = None
    url: str | None = None
    event_types: EventTypes | None = None


class RotateIn(msgspec.Struct, kw_only=True):
    keep_old_secret_active_for_24_hours: bool = False


class TestIn(msgspec.Struct, kw_only=True):
    event_type: str


# -- rendering ----------


def _unix(ts: float | None) -> int | None:
    return None if ts is None else int(ts)


def batch_out(row: BatchRow, files: dict[str, str]) -> BatchOut:
    """The OpenAI batch object of a native batch row (see the module docstring)."""
    data = row.data()
    ended = row.completed_at
    status = {"queued": "in_progress", "running": "in_progress", "failed": "completed",
              "completed": "completed"}.get(row.status, row.status)
    refused = row.status == "failed" and not row.total
    if refused:
        status = "failed"
    errors = data.get("errors")
    return BatchOut(
        id=row.id, endpoint=data.get("endpoint", ""),
        errors=None if not errors else msgspec.convert(
            {"data": errors}, BatchErrors),
        input_file_id=data.get("input_file_id", ""),
        completion_window=data.get("completion_window", "24h"), status=status,
        output_file_id=files.get("batch_output"), error_file_id=files.get("batch_error"),
        created_at=int(row.created_at),
        in_progress_at=None if refused else int(row.created_at),
        expires_at=_unix(row.expires_at),
        finalizing_at=_unix(ended) if status == "completed" else None,
        completed_at=_unix(ended) if status == "completed" else None,
        failed_at=_unix(ended) if status == "failed" else None,
        expired_at=_unix(ended) if status == "expired" else None,
        cancelling_at=_unix(row.cancel_requested_at),
        cancelled_at=_unix(ended) if status == "cancelled" else None,
        request_counts=RequestCounts(row.total, row.succeeded,
                                     row.failed + row.cancelled + row.expired),
        metadata=_decode(row.metadata) if row.metadata and row.metadata != b"{}" else None)


def file_out(row: FileRow) -> FileOut:
    return FileOut(id=row.id, bytes=row.bytes, created_at=int(row.created_at),
                   filename=row.filename, purpose=row.purpose or "batch",
                   expires_at=_unix(row.expires_at))


def endpoint_out(row: EndpointRow, hint: str | None, secret: str | None = None
                 ) -> EndpointOut:
    """An endpoint as OpenAI's WebhookEndpoint (unix seconds)."""
    return EndpointOut(id=row.id, name=row.name, url=row.url, event_types=row.events(),
                       created_at=int(row.created_at), updated_at=int(row.updated_at),
                       signing_secret_hint=hint,
                       signing_secret=msgspec.UNSET if secret is None else secret)


class _Line(msgspec.Struct, kw_only=True):
    """An output or error file line; `response` is the stored envelope, passed through."""

    id: str
    custom_id: str | None
    response: msgspec.Raw | None
    error: dict[str, str] | None


_END_CODES = {"cancelled": ("batch_cancelled", "the batch was cancelled before this request"
                            " started"),
              "expired": ("batch_expired", "the batch expired before this request started")}


def result_line(seq: int, entry_id: str | None, status: str, output: bytes | None,
                error: bytes | None) -> bytes:
    """One line of an output or error file, from an item's result row."""
    problem = None
    if status in _END_CODES:
        code, message = _END_CODES[status]
        problem = {"code": code, "message": message}
    elif output is None:  # failed with no response at all
        reason = "no response" if error is None else readable_error(error).message
        problem = {"code": "request_failed", "message": reason}
    response = None if problem is not None or output is None else msgspec.Raw(output)
    return _encode(_Line(id=f"batch_req_{seq}", custom_id=entry_id, response=response,
                         error=problem)) + b"\n"


# -- the lines of an uploaded batch file ----------


class RequestLines:
    """Reads an OpenAI batch file at upload: every line is kept, the bad ones with their
    problem (code, message, param), which a batch made of the file reports. Never raises
    for a line (`bad_lines` stays 0: store_file's refusal is for native files)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.bad_lines = 0  # store_file's refusal is for native files: never here
        self.errors: list[dict] = []

    def check(self, lines: list[tuple[int, bytes]]) -> list[tuple]:
        rows: list[tuple] = []
        for number, raw in lines:
            custom_id, url, body, problem = self._read(raw.strip())
            if problem is None and custom_id in self.seen:
                problem = ("duplicate_custom_id", f"custom_id {custom_id!r} is used by an"
                           " earlier line", "custom_id")
            if problem is None:
                self.seen.add(custom_id)  # type: ignore[arg-type]
                rows.append((number, custom_id, body, None, url, None))
            else:
                code, message, param = problem
                rows.append((number, custom_id if isinstance(custom_id, str) else None,
                             raw.strip(), None, url,
                             _encode({"code": code, "message": message, "param": param})))
        return rows

    @staticmethod
    def _read(raw: bytes) -> tuple[Any, str | None, bytes | None, tuple | None]:
        """(custom_id, url, encoded body, problem or None) of one line."""
        try:
            line = _decode(raw)
        except (msgspec.DecodeError, RecursionError) as exc:
            return None, None, None, ("invalid_json_line", f"not valid JSON: {exc}", None)
        if not isinstance(line, dict):
            return None, None, None, ("invalid_json_line", "a line must be a JSON object",
                                      None)
        custom_id, url = line.get("custom_id"), line.get("url")
        url = url if isinstance(url, str) else None
        for name, ok in (("custom_id", isinstance(custom_id, str) and custom_id),
                         ("method", line.get("method") == "POST"),
                         ("url", url),
                         ("body", isinstance(line.get("body"), dict))):
            if not ok:
                what = {"method": 'method must be "POST"', "body": "body must be an object"}
                return custom_id, url, None, (
                    "missing_required_parameter", what.get(name, f"{name} is required"),
                    name)
        body = _encode(line["body"])
        if models.too_deep(body):
            return custom_id, url, None, (
                "invalid_json_line", f"body nests deeper than {models.MAX_NESTING} levels",
                "body")
        return custom_id, url, body, None


# -- routes ----------


class OpenAIApi:
    """The `/openai/v1` routes, over the native Api's instance, auth and idempotency."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.mb = api.mb

    # files

    async def create_file(self, request: Request, tenant: str) -> Response:
        async def read() -> tuple[bytes, tuple[bytes, str | None, dict[str, str]]]:
            data, filename, fields = await self.api.multipart_file(
                request, self.mb.settings.max_file_bytes)
            return _encode([filename, sorted(fields.items())]) + b"\n" + data, (
                data, filename, fields)

        async def create(idem: tuple | None, form: tuple) -> Response:
            data, filename, fields = form
            purpose = fields.get("purpose")
            if purpose != "batch":
                raise BadRequest(f"purpose must be 'batch' here, not {purpose!r}")
            now = self.mb.now()
            file = await store_file(self.mb.store, tenant, filename, data, now, idem,
                                    checker=RequestLines(), purpose="batch",
                                    expires_at=_file_expiry(fields, now), build=file_out)
            return _json(file)

        return await self.api.idempotent(request, tenant, read, create, 200, _encode)

    async def list_files(self, request: Request, tenant: str) -> Response:
        q = request.query_params
        limit = limit_arg(q.get("limit"), 10000, 10000)
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidInput("order must be asc or desc", [{"field": "order",
                                                              "message": "asc or desc"}])
        store = self.mb.store
        rows, more = await store.call(store.files_list, tenant, purpose=q.get("purpose"),
                                      after=q.get("after"), limit=limit,
                                      newest_first=order == "desc")
        return _json(_page([file_out(await self._measured(r)) for r in rows], more))

    async def get_file(self, request: Request, tenant: str) -> Response:
        store = self.mb.store
        row = await store.call(store.file_get, request.path_params["file_id"], tenant)
        return _json(file_out(await self._measured(row)))

    async def delete_file(self, request: Request, tenant: str) -> Response:
        file_id = request.path_params["file_id"]
        await self.mb.store.call(self.mb.store.file_delete, file_id, tenant)
        return _json({"id": file_id, "object": "file", "deleted": True})

    async def file_content(self, request: Request, tenant: str) -> Response:
        store = self.mb.store
        row = await store.call(store.file_get, request.path_params["file_id"], tenant)
        lines = self._generated_lines(row) if row.batch is not None else self._input_lines(row)
        return StreamingResponse(lines, media_type="application/octet-stream")

    async def _measured(self, row: FileRow) -> FileRow:
        """A generated file with its size: measured once, on first sight, and kept."""
        if row.batch is None or row.bytes:
            return row
        size = 0
        async for chunk in self._generated_lines(row):
            size += len(chunk)
        await self.mb.store.call(self.mb.store.file_set_bytes, row.id, size)
        return row._replace(bytes=size)

    async def _generated_lines(self, row: FileRow) -> AsyncIterator[bytes]:
        """An output or error file: the batch's items that belong in it, in input order,
        a page per `call`."""
        assert row.batch is not None
        wanted = ("succeeded",) if row.purpose == "batch_output" else (
            "failed", "cancelled", "expired")
        store, after = self.mb.store, -1
        while page := await store.call(store.results_page, row.batch, after, RESULT_PAGE):
            yield b"".join(result_line(seq, entry_id, status, out, err)
                           for _, seq, entry_id, status, out, err, _ in page
                           if status in wanted)
            after = page[-1][0]

    async def _input_lines(self, row: FileRow) -> AsyncIterator[bytes]:
        """An uploaded file: its bytes as they were sent, 8 parts per `call`."""
        store, after = self.mb.store, -1
        while parts := await store.call(store.file_parts_page, row.id, after, 8):
            for _, data in parts:
                yield data
            after = parts[-1][0]

    # batches

    async def create_batch(self, request: Request, tenant: str) -> Response:
        async def read() -> tuple[bytes, BatchIn]:
            body = await self.api.json_body(request)
            return body, decode_json(body, BatchIn)

        async def create(idem: tuple | None, spec: BatchIn) -> Response:
            return Response(await self._create(tenant, spec, idem), media_type=JSON)

        return await self.api.idempotent(request, tenant, read, create, 200,
                                         self._encode_batch)

    async def _create(self, tenant: str, spec: BatchIn, idem: tuple | None) -> bytes:
        """The created batch's body: refused whole (`failed`, with its `errors`) when
        the file has a bad line, else submitted."""
        kind = openai_kind(spec.endpoint)
        if spec.endpoint not in OPENAI_ENDPOINTS or self.mb.registry.get(kind) is None:
            supported = [e for e in OPENAI_ENDPOINTS if self.mb.registry.get(openai_kind(e))]
            raise _param_error(f"endpoint {spec.endpoint!r} is not served here; this server"
                               f" runs {supported or 'none (no upstream is configured)'}",
                               "endpoint")
        if spec.completion_window not in WINDOWS:
            raise _param_error("completion_window must be '24h'", "completion_window")
        store = self.mb.store
        data = {"endpoint": spec.endpoint, "completion_window": spec.completion_window,
                "input_file_id": spec.input_file_id}

        def refused() -> bytes | None:
            """The file checked, its lines too: a refused batch's body if one is bad."""
            try:
                file = store.file_get(spec.input_file_id, tenant)
            except NotFound:
                raise NotFound(f"No such File object: {spec.input_file_id}") from None
            if file.purpose != "batch":
                raise _param_error(f"file {file.id} has purpose {file.purpose!r}, not"
                                   " 'batch'", "input_file_id")
            errors = self._problems(file, spec.endpoint)
            if not errors:
                return None
            return self._encode_batch(store.batch_insert_refused(
                tenant=tenant, kind=kind, now=self.mb.now(), metadata=spec.metadata,
                dialect="openai", dialect_data={**data, "errors": errors}, idempotency=idem))

        if (body := await store.call(refused)) is not None:
            return body
        batch = await self.mb.submit(
            kind, input_file_id=spec.input_file_id, metadata=spec.metadata, tenant=tenant,
            idempotency=idem, expires_after_s=self.mb.settings.completion_window_s,
            dialect="openai", dialect_data=data)
        return await store.call(lambda: self._encode_batch(store.batch_row(batch.id, tenant)))

    def _problems(self, file: FileRow, endpoint: str) -> list[dict]:
        """Every bad line of the file for a batch of `endpoint` (the first
        MAX_LISTED_ERRORS of them), or the file's emptiness."""
        if file.lines == 0:
            return [{"code": "empty_file", "message": "the file has no request lines",
                     "param": None, "line": None}]
        rows = self.mb.store.file_problems(file.id, endpoint, MAX_LISTED_ERRORS)
        errors = []
        for line, problem in rows:
            if problem is not None:
                errors.append({**_decode(problem), "line": line})
            else:
                errors.append({"code": "url_mismatch", "param": "url", "line": line,
                               "message": f"the line's url is not the batch's endpoint"
                                          f" {endpoint}"})
        return errors

    def _encode_batch(self, row: BatchRow) -> bytes:
        """The batch's body; reads its files from the store, so it runs inside a `call`
        (or inside the creating transaction, as an idempotent replay's builder)."""
        return _encode(batch_out(row, self.mb.store.batch_files(row.seq)))

    async def list_batches(self, request: Request, tenant: str) -> Response:
        q = request.query_params
        limit = limit_arg(q.get("limit"), 20, 100)
        after = q.get("after")
        store = self.mb.store

        def page() -> Page:  # the rows and each one's files: one call
            rows, more = store.batch_rows_list(tenant, dialect="openai", after=after,
                                               limit=limit)
            return _page([batch_out(r, store.batch_files(r.seq)) for r in rows], more)

        return _json(await store.call(page))

    async def get_batch(self, request: Request, tenant: str) -> Response:
        batch_id = request.path_params["batch_id"]
        body = await self.mb.store.call(
            lambda: self._encode_batch(self._row(batch_id, tenant)))
        return Response(body, media_type=JSON)

    async def cancel_batch(self, request: Request, tenant: str) -> Response:
        store = self.mb.store
        row = await store.call(self._row, request.path_params["batch_id"], tenant)
        if row.status in models.BATCH_TERMINAL:
            raise BadRequest(f"batch {row.id} has already ended ({batch_out(row, {}).status});"
                             " only a batch in progress can be cancelled")
        await self.mb.cancel(row.id, tenant=tenant)
        body = await store.call(lambda: self._encode_batch(store.batch_row(row.id, tenant)))
        return Response(body, media_type=JSON)

    def _row(self, batch_id: str, tenant: str) -> BatchRow:
        """The tenant's OpenAI batch (a store read: run it through `call`)."""
        try:
            row = self.mb.store.batch_row(batch_id, tenant)
        except NotFound:
            raise NotFound(f"No such Batch object: {batch_id}") from None
        if row.dialect != "openai":
            raise NotFound(f"No such Batch object: {batch_id}")
        return row

    # webhook endpoints

    async def create_endpoint(self, request: Request, tenant: str) -> Response:
        spec = decode_json(await self.api.json_body(request), EndpointIn)

        def create() -> EndpointOut:
            row, secret = self.mb.create_endpoint(tenant, spec.name, spec.url,
                                                  spec.event_types, BATCH_EVENT_TYPES)
            return self._endpoint(row, secret)

        return _json(await self.mb.store.call(create))

    async def list_endpoints(self, request: Request, tenant: str) -> Response:
        q = request.query_params
        after, limit = q.get("after"), limit_arg(q.get("limit"), 20, 100)

        def page() -> Page:  # the rows and each one's hint: one call
            rows, more = self.mb.store.endpoints_list(tenant, after=after, limit=limit)
            return _page([self._endpoint(r) for r in rows], more)

        return _json(await self.mb.store.call(page))

    async def get_endpoint(self, request: Request, tenant: str) -> Response:
        endpoint_id = request.path_params["endpoint_id"]
        return _json(await self.mb.store.call(
            lambda: self._endpoint(self.mb.store.endpoint_get(endpoint_id, tenant))))

    async def update_endpoint(self, request: Request, tenant: str) -> Response:
        spec = decode_json(await self.api.json_body(request) or b"{}", EndpointUpdate)
        endpoint_id = request.path_params["endpoint_id"]

        def update() -> EndpointOut:
            return self._endpoint(self.mb.update_endpoint(
                tenant, endpoint_id, name=spec.name, url=spec.url,
                event_types=spec.event_types, allowed=BATCH_EVENT_TYPES))

        return _json(await self.mb.store.call(update))

    async def delete_endpoint(self, request: Request, tenant: str) -> Response:
        endpoint_id = request.path_params["endpoint_id"]
        await self.mb.store.call(self.mb.store.endpoint_delete, endpoint_id, tenant)
        return _json({"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True})

    async def rotate_endpoint(self, request: Request, tenant: str) -> Response:
        spec = decode_json(await self.api.json_body(request) or b"{}", RotateIn)
        endpoint_id = request.path_params["endpoint_id"]
        overlap = 86400.0 if spec.keep_old_secret_active_for_24_hours else 0.0

        def rotate() -> EndpointOut:
            row, secret = self.mb.rotate_endpoint_secret(tenant, endpoint_id, overlap)
            return self._endpoint(row, secret)

        return _json(await self.mb.store.call(rotate))

    async def test_endpoint(self, request: Request, tenant: str) -> Response:
        spec = decode_json(await self.api.json_body(request), TestIn)
        if spec.event_type not in BATCH_EVENT_TYPES:
            raise _param_error(f"event_type must be one of {', '.join(BATCH_EVENT_TYPES)}",
                               "event_type")
        endpoint_id = request.path_params["endpoint_id"]
        payload = _encode({"id": f"evt_{secrets.token_hex(12)}", "object": "event",
                           "type": spec.event_type, "created_at": int(self.mb.now()),
                           "data": {"id": "batch_test"}})
        status = await self.mb.test_endpoint(tenant, endpoint_id, payload)
        return _json({"object": "webhook_endpoint.test", "event_type": spec.event_type,
                      "status_code": status, "success": True,
                      "webhook_endpoint_id": endpoint_id})

    def _endpoint(self, row: EndpointRow, secret: str | None = None) -> EndpointOut:
        """Reads the secret's hint from the store: runs inside a `call`."""
        return endpoint_out(row, self.mb.endpoint_secret_hint(row), secret)


def _file_expiry(fields: dict[str, str], now: float) -> float | None:
    """`expires_after[anchor]=created_at` and `expires_after[seconds]` (1 h to 30 days)."""
    seconds = fields.get("expires_after[seconds]")
    if seconds is None:
        return None
    if fields.get("expires_after[anchor]", "created_at") != "created_at" or not (
            seconds.isdigit() and 3600 <= int(seconds) <= 2_592_000):
        raise _param_error("expires_after needs anchor 'created_at' and 3600-2592000 seconds",
                           "expires_after")
    return now + int(seconds)


def _page(data: list[Any], more: bool) -> Page:
    return Page(data, data[0].id if data else None, data[-1].id if data else None, more)


def _json(obj: Any) -> Response:
    return Response(_encode(obj), media_type=JSON)


def _param_error(message: str, param: str) -> InvalidInput:
    return InvalidInput(message, [{"field": param, "message": message}])


# -- errors in OpenAI's shape ----------

_TYPES = {400: "invalid_request_error", 422: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 409: "conflict", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error",
          500: "server_error"}


def openai_error(exc: MinibatchError) -> Response:
    """OpenAI's error body. Bad input is a 400 (OpenAI's status for it, and one the SDK
    does not retry); our 422s become 400s, but for a reused Idempotency-Key (422 in every
    dialect, as the IETF draft has it)."""
    status = 400 if exc.status == 422 and not isinstance(exc, IdempotencyMismatch) else (
        exc.status)
    param = exc.errors[0].get("field") if exc.errors else None
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
    body = {"error": {"message": exc.detail, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return Response(_encode(body), status_code=status, media_type=JSON, headers=exc.headers)


ROUTES = [
    ("POST", "/files", "create_file"), ("GET", "/files", "list_files"),
    ("GET", "/files/{file_id}", "get_file"), ("DELETE", "/files/{file_id}", "delete_file"),
    ("GET", "/files/{file_id}/content", "file_content"),
    ("POST", "/batches", "create_batch"), ("GET", "/batches", "list_batches"),
    ("GET", "/batches/{batch_id}", "get_batch"),
    ("POST", "/batches/{batch_id}/cancel", "cancel_batch"),
    ("POST", "/webhook_endpoints", "create_endpoint"),
    ("GET", "/webhook_endpoints", "list_endpoints"),
    ("GET", "/webhook_endpoints/{endpoint_id}", "get_endpoint"),
    ("POST", "/webhook_endpoints/{endpoint_id}", "update_endpoint"),
    ("DELETE", "/webhook_endpoints/{endpoint_id}", "delete_endpoint"),
    ("POST", "/webhook_endpoints/{endpoint_id}/rotate_secret", "rotate_endpoint"),
    ("POST", "/webhook_endpoints/{endpoint_id}/test", "test_endpoint"),
]


def create_app(api: Api) -> Starlette:
    """The dialect, to mount at /openai/v1."""
    return dialect_app(api, OpenAIApi(api), ROUTES, openai_error)
