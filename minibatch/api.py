"""The HTTP API: bytes -> Struct -> Minibatch call -> Struct -> bytes.

Every route is one `Endpoint` in ENDPOINTS, which `openapi.py` also reads, so the served
routes and the published spec cannot drift. Every error, ours or Starlette's, leaves as
application/problem+json through `problem_response`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, get_args

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from . import metrics, models, openapi
from .auth import Authenticator, Idempotency
from .delivery import literal_blocked
from .errors import (
    BadRequest,
    InvalidInput,
    MinibatchError,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from .files import body_digest
from .logs import RequestLog
from .models import (
    Batch,
    BatchCreate,
    BatchPage,
    Delivery,
    DeliveryList,
    FileObject,
    Health,
    ItemPage,
    Problem,
    RotateSecret,
    SecretRotated,
)
from .readcache import ReadCache
from .store import BatchRow, EndpointRow, batch_struct, item_id

if TYPE_CHECKING:
    from .app import Minibatch

log = logging.getLogger("minibatch.api")
JSON = "application/json"
PROBLEM = "application/problem+json"
JSONL = "application/jsonl"
_encode = models.encoder.encode
_AT = re.compile(r" - at `\$\.?(.*)`$")
_BATCH_STATUSES = get_args(models.BatchStatus)
_ITEM_STATUSES = get_args(models.ItemStatus)


class Endpoint(NamedTuple):
    method: str
    path: str
    name: str  # the method of `Api` that serves it
    summary: str
    status: int = 200
    body: Any = None  # request Struct (JSON) or "file"
    response: Any = None  # response Struct, or a media type for non-JSON bodies
    query: tuple[str, ...] = ()
    auth: bool = True


ENDPOINTS = [
    Endpoint("POST", "/v1/files", "create_file", "Upload a JSONL file of items", 201, "file",
             FileObject),
    Endpoint("POST", "/v1/batches", "create_batch", "Create a batch", 201, BatchCreate, Batch),
    Endpoint("GET", "/v1/batches", "list_batches", "List batches, newest first",
             response=BatchPage, query=("status", "limit", "after")),
    Endpoint("GET", "/v1/batches/{batch_id}", "get_batch", "Get a batch (its polling_url)",
             response=Batch),
    Endpoint("GET", "/v1/batches/{batch_id}/items", "list_items",
             "List a batch's items in submission order", response=ItemPage,
             query=("status", "limit", "after")),
    Endpoint("GET", "/v1/batches/{batch_id}/results", "results",
             "Stream results as JSONL, one line per terminal item", response=JSONL),
    Endpoint("POST", "/v1/batches/{batch_id}/cancel", "cancel_batch", "Cancel a batch",
             response=Batch),
    Endpoint("DELETE", "/v1/batches/{batch_id}", "delete_batch",
             "Delete an ended batch with its items, results and deliveries (409 while it"
             " runs)", response=JSON),
    Endpoint("DELETE", "/v1/files/{file_id}", "delete_file",
             "Delete an uploaded file (batches made from it keep their items)",
             response=JSON),
    Endpoint("GET", "/v1/batches/{batch_id}/deliveries", "list_deliveries",
             "Webhook deliveries of a batch, oldest first, with attempts",
             response=DeliveryList, query=("limit", "after")),
    Endpoint("POST", "/v1/deliveries/{delivery_id}/retry", "retry_delivery",
             "Send a delivery again (same bytes, same webhook-id)", 202, response=Delivery),
    Endpoint("POST", "/v1/webhook-secret/rotate", "rotate_secret",
             "Make a new primary webhook signing secret", body=RotateSecret,
             response=SecretRotated),
    Endpoint("POST", "/v1/webhook-endpoints", "create_endpoint",
             "Register a webhook endpoint for the events of all the tenant's batches", 201,
             models.WebhookEndpointIn, models.WebhookEndpoint),
    Endpoint("GET", "/v1/webhook-endpoints", "list_endpoints",
             "List webhook endpoints, newest first", response=models.EndpointPage,
             query=("limit", "after")),
    Endpoint("GET", "/v1/webhook-endpoints/{endpoint_id}", "get_endpoint",
             "Get a webhook endpoint", response=models.WebhookEndpoint),
    Endpoint("POST", "/v1/webhook-endpoints/{endpoint_id}", "update_endpoint",
             "Change a webhook endpoint's name, url or event types",
             body=models.WebhookEndpointUpdate, response=models.WebhookEndpoint),
    Endpoint("DELETE", "/v1/webhook-endpoints/{endpoint_id}", "delete_endpoint",
             "Delete a webhook endpoint", response=JSON),
    Endpoint("POST", "/v1/webhook-endpoints/{endpoint_id}/rotate-secret", "rotate_endpoint",
             "A new signing secret for the endpoint", body=models.EndpointRotate,
             response=models.WebhookEndpoint),
    Endpoint("POST", "/v1/webhook-endpoints/{endpoint_id}/test", "test_endpoint",
             "Send the endpoint one signed sample event now", body=models.EndpointTest,
             response=models.EndpointTested),
    Endpoint("GET", "/healthz", "healthz", "Liveness", response=Health, auth=False),
    Endpoint("GET", "/metrics", "metrics", "Prometheus metrics (no tenant data)",
             response="text/plain", auth=False),
    Endpoint("GET", "/openapi.json", "openapi", "This OpenAPI document", response=JSON,
             auth=False),
]


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_encode(obj), status_code=status, media_type=JSON)


def problem_response(exc: MinibatchError) -> Response:
    errors = [models.FieldError(**e) for e in exc.errors]
    body = Problem(type=exc.type, title=exc.title, status=exc.status, detail=exc.detail,
                   errors=errors)
    return Response(_encode(body), status_code=exc.status, media_type=PROBLEM,
                    headers=exc.headers)


def validation_error(exc: msgspec.ValidationError) -> InvalidInput:
    """msgspec's `… - at `$.items[3].input`` becomes field `items[3].input`."""
    message = str(exc)
    match = _AT.search(message)
    field = (match.group(1) or "body") if match else "body"
    return InvalidInput(message, [{"field": field, "message": _AT.sub("", message)}])


def decode_json(body: bytes, type_: Any) -> Any:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None


class Api:
    """The route handlers, bound to one Minibatch.

    A route of an Endpoint with `auth` (the default) is called with the request's tenant,
    found before the handler runs (`create_app`), so no handler can forget to ask.
    """

    def __init__(self, mb: Minibatch) -> None:
        self.mb = mb
        self.reads = ReadCache(mb.store)
        self.auth = Authenticator(mb.store, lambda: mb.now(), mb.settings.rate_limit,
                                  self.reads)
        self.idempotency = Idempotency(mb.store)
        self._openapi: bytes | None = None

    # -- reading requests ----------

    async def read_body(self, request: Request, limit: int) -> bytes:
        """The body, refused with 413 as soon as it passes `limit` (never read whole)."""
        _refuse_declared_over(request, limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body is over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_body(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type", JSON).split(";")[0].strip().lower()
        if ctype != JSON and not ctype.endswith("+json"):
            raise UnsupportedMediaType(f"send {JSON}, not {ctype}")
        return await self.read_body(request, self.mb.settings.max_json_bytes)

    async def idempotent(self, request: Request, tenant: str,
                         read: Callable[[], Awaitable[tuple[bytes, Any]]],
                         create: Callable[[tuple | None, Any], Awaitable[Response]],
                         status: int = 201, build: Callable[[Any], bytes] | None = None
                         ) -> Response:
        """`read` the request, then `create` what it asks for, under the request's
        Idempotency-Key if it has one. `read` returns (the bytes the key covers, what
        `create` needs). The key is in flight from before the body is read, so a second
        request with it is a 409 however slowly the first one's body arrives. A replay
        answers `status` with the body `build` made of what was created (a dialect's own
        shape; ours by default)."""
        key = request.headers.get("idempotency-key")
        if key is None:
            return await create(None, (await read())[1])
        self.idempotency.begin(tenant, key)
        try:
            signed, prepared = await read()
            body_hash = await body_digest(signed)
            stored = await self.idempotency.stored(tenant, key, body_hash)
            if stored is not None:
                return Response(stored[2], status_code=stored[1], media_type=JSON,
                                headers={"idempotent-replayed": "true"})
            return await create((key, body_hash, status, build or _encode_created), prepared)
        finally:
            self.idempotency.end(tenant, key)

    @staticmethod
    def page_args(request: Request, statuses: tuple[str, ...] = ()
                  ) -> tuple[str | None, int, str | None]:
        q = request.query_params
        status = q.get("status")
        if status is not None and status not in statuses:
            raise InvalidInput(f"unknown status {status!r}",
                               [{"field": "status", "message": f"one of {', '.join(statuses)}"}])
        return status, limit_arg(q.get("limit"), 100, 1000), q.get("after")

    # -- routes ----------

    async def create_file(self, request: Request, tenant: str) -> Response:
        async def read() -> tuple[bytes, tuple[bytes, str | None]]:
            limit = self.mb.settings.max_file_bytes
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                data, filename, fields = await self.multipart_file(request, limit)
                # The key covers the whole request, not only the file's bytes (the
                # boundary is random per request, so the raw body cannot be compared).
                return _encode([filename, sorted(fields.items())]) + b"\n" + data, (
                    data, filename)
            data = await self.read_body(request, limit)
            return data, (data, None)

        async def create(idem: tuple | None, upload: tuple[bytes, str | None]) -> Response:
            data, filename = upload
            file = await self.mb.create_file(data, filename=filename, tenant=tenant,
                                             idempotency=idem)
            return json_response(file, 201)

        return await self.idempotent(request, tenant, read, create)

    async def multipart_file(self, request: Request, limit: int
                              ) -> tuple[bytes, str | None, dict[str, str]]:
        """The `file` part's bytes and name, and the form's other fields."""
        _refuse_declared_over(request, limit)
        limited = Request(request.scope, _limited_receive(request.receive, limit))
        try:
            form = await limited.form(max_files=1, max_fields=10, max_part_size=1024 * 1024)
        except HTTPException as exc:  # Starlette's multipart parser refuses bad forms
            raise BadRequest(f"malformed multipart body: {exc.detail}") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidInput("multipart body needs a file field named 'file'",
                                   [{"field": "file", "message": "missing"}])
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            return await upload.read(), upload.filename, fields
        finally:
            await form.close()

    async def create_batch(self, request: Request, tenant: str) -> Response:
        async def read() -> tuple[bytes, BatchCreate]:
            body = await self.json_body(request)
            spec = decode_json(body, BatchCreate)
            if (spec.items is None) == (spec.input_file_id is None):
                raise InvalidInput("send exactly one of items or input_file_id",
                                   [{"field": "items", "message": "items or input_file_id"}])
            if spec.webhook is not None:
                self._check_webhook_url(spec.webhook.url)
            return body, spec

        async def create(idem: tuple | None, spec: BatchCreate) -> Response:
            batch = await self.mb.submit(
                spec.kind, spec.items or (), webhook=spec.webhook, metadata=spec.metadata,
                max_attempts=spec.max_attempts, item_timeout_s=spec.item_timeout_s,
                concurrency=spec.concurrency, input_file_id=spec.input_file_id,
                expires_after_s=spec.expires_after_s, tenant=tenant, idempotency=idem)
            return json_response(batch, 201)

        return await self.idempotent(request, tenant, read, create)

    def _check_webhook_url(self, url: str) -> None:
        """A literal private address is refused up front (names resolve at send time);
        `submit` checks the scheme and host."""
        reason = None if self.mb.settings.allow_private_webhooks else literal_blocked(url)
        if reason:
            raise InvalidInput(f"webhook.url is refused: {reason}",
                               [{"field": "webhook.url", "message": reason}])

    async def list_batches(self, request: Request, tenant: str) -> Response:
        status, limit, after = self.page_args(request, _BATCH_STATUSES)
        store = self.mb.store
        batches, more = await store.call(store.batches_list, tenant, status=status,
                                         limit=limit, after=after)
        cursor = batches[-1].id if more else None
        return json_response(BatchPage(batches, more, cursor))

    async def get_batch(self, request: Request, tenant: str) -> Response:
        batch_id = request.path_params["batch_id"]
        body = await self.reads.body(("batch", tenant, batch_id),
                                     lambda: self.mb.store.batch_get(batch_id, tenant))
        return Response(body, media_type=JSON)

    async def list_items(self, request: Request, tenant: str) -> Response:
        status, limit, after = self.page_args(request, _ITEM_STATUSES)
        index = -1 if after is None else decimal_arg(after)  # 18 digits: inside SQLite's ints
        if index is None:
            raise InvalidInput(f"unknown cursor {after!r}",
                               [{"field": "after", "message": "unknown cursor"}])
        store = self.mb.store
        items, more = await store.call(store.items_page, request.path_params["batch_id"],
                                       tenant, status=status, limit=limit, after=index)
        cursor = str(items[-1].index) if more else None
        return json_response(ItemPage(items, more, cursor))

    async def results(self, request: Request, tenant: str) -> Response:
        pages = self.mb.result_pages(request.path_params["batch_id"], tenant=tenant)
        first = await anext(pages, None)  # a 404 is raised here, before streaming starts
        return StreamingResponse(result_lines(first, pages), media_type=JSONL)

    async def cancel_batch(self, request: Request, tenant: str) -> Response:
        return json_response(await self.mb.cancel(request.path_params["batch_id"],
                                                  tenant=tenant))

    async def delete_batch(self, request: Request, tenant: str) -> Response:
        batch_id = request.path_params["batch_id"]
        await self.mb.store.call(lambda: self.mb.store.batch_delete(batch_id, tenant,
                                                                    self.mb.now()))
        return json_response({"id": batch_id, "object": "batch.deleted", "deleted": True})

    async def delete_file(self, request: Request, tenant: str) -> Response:
        file_id = request.path_params["file_id"]
        await self.mb.store.call(self.mb.store.file_delete, file_id, tenant)
        return json_response({"id": file_id, "object": "file.deleted", "deleted": True})

    async def list_deliveries(self, request: Request, tenant: str) -> Response:
        _, limit, after = self.page_args(request)
        deliveries, more = await self.mb.store.call(
            self.mb.deliveries_page, request.path_params["batch_id"], tenant, limit=limit,
            after=after)
        return json_response(DeliveryList(deliveries, more, deliveries[-1].id if more else None))

    async def retry_delivery(self, request: Request, tenant: str) -> Response:
        delivery = await self.mb.redeliver(request.path_params["delivery_id"], tenant=tenant)
        return json_response(delivery, 202)

    async def rotate_secret(self, request: Request, tenant: str) -> Response:
        body = await self.json_body(request)
        spec = decode_json(body or b"{}", RotateSecret)
        return json_response(await self.mb.store.call(self.mb.rotate_secret, tenant,
                                                      spec.overlap_s))

    async def create_endpoint(self, request: Request, tenant: str) -> Response:
        spec = decode_json(await self.json_body(request), models.WebhookEndpointIn)

        def create() -> models.WebhookEndpoint:
            row, secret = self.mb.create_endpoint(tenant, spec.name, spec.url,
                                                  list(spec.event_types))
            return self._endpoint(row, secret)

        return json_response(await self.mb.store.call(create), 201)

    async def list_endpoints(self, request: Request, tenant: str) -> Response:
        _, limit, after = self.page_args(request)

        def page() -> models.EndpointPage:  # the rows and each one's hint: one call
            rows, more = self.mb.store.endpoints_list(tenant, after=after, limit=limit)
            return models.EndpointPage([self._endpoint(r) for r in rows], more,
                                       rows[-1].id if more else None)

        return json_response(await self.mb.store.call(page))

    async def get_endpoint(self, request: Request, tenant: str) -> Response:
        endpoint_id = request.path_params["endpoint_id"]
        return json_response(await self.mb.store.call(
            lambda: self._endpoint(self.mb.store.endpoint_get(endpoint_id, tenant))))

    async def update_endpoint(self, request: Request, tenant: str) -> Response:
        spec = decode_json(await self.json_body(request) or b"{}",
                           models.WebhookEndpointUpdate)
        endpoint_id = request.path_params["endpoint_id"]

        def update() -> models.WebhookEndpoint:
            return self._endpoint(self.mb.update_endpoint(
                tenant, endpoint_id, name=spec.name, url=spec.url,
                event_types=None if spec.event_types is None else list(spec.event_types)))

        return json_response(await self.mb.store.call(update))

    async def delete_endpoint(self, request: Request, tenant: str) -> Response:
        endpoint_id = request.path_params["endpoint_id"]
        await self.mb.store.call(self.mb.store.endpoint_delete, endpoint_id, tenant)
        return json_response({"id": endpoint_id, "object": "webhook_endpoint.deleted",
                              "deleted": True})

    async def rotate_endpoint(self, request: Request, tenant: str) -> Response:
        spec = decode_json(await self.json_body(request) or b"{}", models.EndpointRotate)
        endpoint_id = request.path_params["endpoint_id"]
        overlap = 86400.0 if spec.keep_old_secret_active_for_24_hours else 0.0

        def rotate() -> models.WebhookEndpoint:
            row, secret = self.mb.rotate_endpoint_secret(tenant, endpoint_id, overlap)
            return self._endpoint(row, secret)

        return json_response(await self.mb.store.call(rotate))

    async def test_endpoint(self, request: Request, tenant: str) -> Response:
        spec = decode_json(await self.json_body(request), models.EndpointTest)
        sample = models.Event(spec.event_type, models.to_datetime(self.mb.now()),
                              {"id": "batch_test"})
        status = await self.mb.test_endpoint(tenant, request.path_params["endpoint_id"],
                                             _encode(sample))
        return json_response(models.EndpointTested(event_type=spec.event_type,
                                                   status_code=status))

    def _endpoint(self, row: EndpointRow, secret: str | None = None
                  ) -> models.WebhookEndpoint:
        """The endpoint as the API shows it; reads its secret's hint from the store, so
        it runs inside a `call`."""
        return models.WebhookEndpoint(
            id=row.id, name=row.name, url=row.url, event_types=row.events(),
            created_at=models.to_datetime(row.created_at),
            updated_at=models.to_datetime(row.updated_at),
            signing_secret_hint=self.mb.endpoint_secret_hint(row),
            signing_secret=msgspec.UNSET if secret is None else secret)

    async def healthz(self, request: Request) -> Response:
        return json_response(Health("ok"))

    async def metrics(self, request: Request) -> Response:
        text = metrics.render(await self.mb.store.call(self.mb.store.counts), self.mb.latency)
        return Response(text, media_type="text/plain; version=0.0.4")

    async def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = _encode(openapi.document(ENDPOINTS))
        return Response(self._openapi, media_type=JSON)


def _encode_created(created: Any) -> bytes:
    """The 201 body an idempotent replay sends: the created batch or file."""
    if isinstance(created, BatchRow):
        batch = batch_struct(created)
        batch.deliveries, batch.failed_webhooks = models.DeliverySummary(), []
        return _encode(batch)
    return _encode(created)


class _ResultLine(msgspec.Struct, kw_only=True):
    """A `Result` as it is streamed: output and error are the stored JSON bytes, passed
    through undecoded (same fields, same order, same encoding)."""

    id: str
    entry_id: str | None
    status: str
    output: msgspec.Raw | None
    error: msgspec.Raw | None
    attempts: int


async def result_lines(first: list[tuple] | None, rest: AsyncIterator[list[tuple]]
                        ) -> AsyncIterator[bytes]:
    """JSONL lines; output and error are stored JSON and are passed through as Raw."""
    page = first
    while page:
        yield b"".join(
            _encode(_ResultLine(id=item_id(seq), entry_id=entry_id, status=status,
                                output=None if out is None else msgspec.Raw(out),
                                error=None if err is None else msgspec.Raw(err),
                                attempts=attempts)) + b"\n"
            for _, seq, entry_id, status, out, err, attempts in page)
        page = await anext(rest, None)


def limit_arg(text: str | None, default: int, top: int) -> int:
    """A page's `limit` query value: 1 to `top`, `default` when absent (422 otherwise)."""
    limit = default if text is None else decimal_arg(text)
    if limit is None or not 1 <= limit <= top:
        raise InvalidInput(f"limit must be an integer from 1 to {top}",
                           [{"field": "limit", "message": f"1-{top}"}])
    return limit


def decimal_arg(text: str) -> int | None:
    """An int from at most 18 ASCII digits (str.isdigit also accepts '³' and friends;
    Python refuses to read ints past 4,300 digits, and nothing here needs 19)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _refuse_declared_over(request: Request, limit: int) -> None:
    declared = decimal_arg(request.headers.get("content-length", ""))
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")


def _limited_receive(receive: Callable, limit: int) -> Callable:
    seen = 0

    async def limited() -> dict:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
        return message

    return limited


def as_error(exc: Exception) -> MinibatchError:
    """One of our errors, or Starlette's HTTPException (an unknown route, a wrong method)
    as one, so every dialect renders both alike."""
    if isinstance(exc, MinibatchError):
        return exc
    assert isinstance(exc, HTTPException)
    error = MinibatchError(exc.detail)
    error.status = exc.status_code
    error.title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code,
                                                                  "HTTP error")
    error.headers = dict(exc.headers or {})
    return error


async def _problem_handler(request: Request, exc: Exception) -> Response:
    return problem_response(as_error(exc))


async def _client_gone(request: Request, exc: Exception) -> Response:
    """A client that hung up mid-body: one log line; the response goes nowhere."""
    log.info("client disconnected before sending the whole body of %s %s",
             request.method, request.url.path)
    return Response(status_code=400)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error serving %s %s", request.method, request.url.path)
    return problem_response(MinibatchError("internal error; see the server log"))


def with_tenant(api: Api, handler: Callable[[Request, str], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
    """`handler`, called with the request's tenant: authentication happens before it."""
    async def authenticated(request: Request) -> Response:
        return await handler(request, await api.auth.tenant(request))

    return authenticated


def _endpoint(api: Api, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """The route's handler; unless the endpoint is public, called with the request's
    tenant, so authentication is the default of every route."""
    handler = getattr(api, endpoint.name)
    return with_tenant(api, handler) if endpoint.auth else handler


def dialect_app(api: Api, dialect: Any, routes: list[tuple[str, str, str]],
                render_error: Callable[[MinibatchError], Response]) -> Starlette:
    """A dialect's routes as an app of its own, to mount under its prefix: each route
    (method, path, name of a `dialect` method) gets the request's tenant, as ours do,
    and every error leaves in the dialect's shape."""
    async def on_error(request: Request, exc: Exception) -> Response:
        return render_error(as_error(exc))

    return Starlette(
        routes=[Route(path, with_tenant(api, getattr(dialect, name)), methods=[method])
                for method, path, name in routes],
        exception_handlers={MinibatchError: on_error, HTTPException: on_error,
                            ClientDisconnect: _client_gone, Exception: _server_error})


def create_app(mb: Minibatch) -> RequestLog:
    """The whole HTTP API: the native routes, both dialects mounted, and request ids."""
    api = Api(mb)
    # Starlette tries routes in order, and a polled batch is most of the traffic.
    polled_first = sorted(ENDPOINTS, key=lambda e: e.name != "get_batch")
    routes: list[BaseRoute] = [Route(e.path, _endpoint(api, e), methods=[e.method])
                               for e in polled_first]
    from . import anthropic_api, dashboard, openai_api  # these build on this module

    routes.append(Mount("/openai/v1", app=openai_api.create_app(api)))
    routes.append(Mount("/anthropic", app=anthropic_api.create_app(api)))
    routes.append(Mount("/ui", app=dashboard.create_app(api)))
    return RequestLog(Starlette(routes=routes, exception_handlers={
        MinibatchError: _problem_handler, HTTPException: _problem_handler,
        ClientDisconnect: _client_gone, Exception: _server_error}),
        access=mb.settings.access_log)

