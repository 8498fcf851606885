"""`Minibatch`: composes the store, the runner and the deliverer behind the Python API.

`async with mb:` starts the item loops and webhook delivery in one anyio task group;
leaving it finishes or hands back in-flight work. `run_batch` is the sync facade.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import anyio
import msgspec

from . import models, signing
from .auth import IDEMPOTENCY_WINDOW_S
from .config import make_settings
from .delivery import Deliverer, literal_blocked
from .errors import BadRequest, InvalidInput
from .files import store_file
from .handlers import Registry
from .metrics import Histogram
from .models import Batch, ItemError, Result
from .retention import Pruner
from .runner import Runner
from .store import EndpointRow, Store, item_id, new_id, open_store
from .upstream import ANTHROPIC_KIND, as_request_handler, openai_kind, register_upstream

DEFAULT_TENANT = "default"
RESULTS_PAGE = 1000
_decode = msgspec.json.decode


class Minibatch:
    """An embedded batch runner on one SQLite file.

    `path` is the database file (":memory:" for tests); `options` are `Settings` fields
    such as `lease_s`, `allow_private_webhooks` or `webhook_retry_schedule`.
    """

    def __init__(self, path: str = "minibatch.db", **options: Any) -> None:
        self.settings = make_settings(db=path, **options)
        self.store: Store = open_store(path, synchronous=self.settings.synchronous,
                                       webhook_schedule=self.settings.webhook_retry_schedule)
        self.registry = Registry()
        self.now: Callable[[], float] = self.store.clock  # the database's time
        self.latency = Histogram()  # item attempt durations, for /metrics
        self.runner: Runner | None = None
        self.deliverer: Deliverer | None = None
        # What `async with mb` starts: `minibatch serve --workers N` runs the items in N
        # worker processes (runs_items off here, delivers off there).
        self.runs_items = True
        self.delivers = True
        self.prunes = True  # deleted batches' rows, retention_days, old idempotency keys
        self.pruner: Pruner | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._on_close: list[Callable[[], Awaitable[None]]] = []
        register_upstream(self)  # with `openai_upstream` set, it runs the OpenAI endpoints

    # -- handlers and lifecycle ----------

    def handler(self, kind: str, *, concurrency: int | None = None, timeout: float | None = None,
                max_attempts: int | None = None, interruptible: bool = True,
                group: int | None = None) -> Callable:
        """Register the decorated function (async, or sync to run in a thread) for `kind`.
        With `interruptible=False`, cancelling a batch lets its running items finish.
        With `group=G` it takes a list of up to G Items and returns a list of one outcome
        per item, in order: an output, or a `Fail`/`Retry`/other exception instance that
        ends that item alone; `concurrency` then counts calls, `timeout` one call."""
        def register(fn: Callable) -> Callable:
            self.registry.register(kind, fn, concurrency=concurrency, timeout=timeout,
                                   max_attempts=max_attempts, interruptible=interruptible,
                                   group=group)
            return fn
        return register

    def openai_handler(self, endpoint: str, *, concurrency: int | None = None,
                       timeout: float | None = None, max_attempts: int | None = None
                       ) -> Callable:
        """Register the decorated function to run the requests of OpenAI batches of
        `endpoint` (e.g. "/v1/chat/completions"): it gets an Item whose input is a line's
        body and returns the response body (status 200), or raises Fail/Retry."""
        return self._request_handler(openai_kind(endpoint), concurrency, timeout,
                                     max_attempts)

    def anthropic_handler(self, *, concurrency: int | None = None,
                          timeout: float | None = None, max_attempts: int | None = None
                          ) -> Callable:
        """Register the decorated function to run the requests of Anthropic message
        batches: it gets an Item whose input is a request's `params` and returns a
        Message, or raises Fail/Retry."""
        return self._request_handler(ANTHROPIC_KIND, concurrency, timeout, max_attempts)

    def _request_handler(self, kind: str, concurrency: int | None, timeout: float | None,
                         max_attempts: int | None) -> Callable:
        def register(fn: Callable) -> Callable:
            self.registry.register(kind, as_request_handler(fn), concurrency=concurrency,
                                   timeout=timeout, max_attempts=max_attempts,
                                   interruptible=False)
            return fn
        return register

    async def __aenter__(self) -> Minibatch:
        await self.store.call(lambda: self.store.idempotency_prune(
            self.now() - IDEMPOTENCY_WINDOW_S))
        self._task_group = await anyio.create_task_group().__aenter__()
        if self.runs_items:
            self.runner = Runner(self.store, self.registry, self.settings, self.now,
                                 self.latency)
            await self.runner.run(self._task_group)
        if self.delivers:
            self.deliverer = Deliverer(self.store, self.settings, self.now)
            await self.deliverer.run(self._task_group)
        if self.prunes:
            self.pruner = Pruner(self.store, self.settings, self.now)
            await self.pruner.run(self._task_group)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._task_group is not None
        if self.pruner is not None:
            self.pruner.stopping.set()  # a pass under way stops at its next chunk
        with anyio.CancelScope(shield=True):
            if self.runner is not None:
                await self.runner.drain(self.settings.shutdown_grace_s)
            if self.deliverer is not None:
                await self.deliverer.close()
            for cleanup in self._on_close:
                await cleanup()
        self._task_group.cancel_scope.cancel()
        try:
            # The body's own exception is not handed to the task group, so it propagates
            # as itself rather than wrapped in an ExceptionGroup.
            await self._task_group.__aexit__(None, None, None)
        finally:
            if self.pruner is not None:
                self.pruner.close()  # its thread has ended with the task group
            self._task_group = self.runner = self.deliverer = self.pruner = None

    def on_close(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Await `cleanup` when the runner stops (after in-flight items are done)."""
        self._on_close.append(cleanup)

    def close(self) -> None:
        self.store.close()

    # -- the API ----------

    async def submit(
        self,
        kind: str,
        items: Iterable[Any] = (),
        *,
        webhook: dict | models.WebhookIn | None = None,
        metadata: dict | None = None,
        max_attempts: int | None = None,
        item_timeout_s: float | None = None,
        concurrency: int | None = None,
        input_file_id: str | None = None,
        expires_after_s: float | None = None,
        tenant: str = DEFAULT_TENANT,
        idempotency: tuple | None = None,
        dialect: str = "native",
        dialect_data: dict | None = None,
        id_prefix: str = "batch",
    ) -> Batch:
        """Store a batch of `kind` and its items (dicts with `input`, optional `entry_id`,
        `metadata`; any iterable, read lazily in chunks). Raises InvalidInput and writes
        nothing when the kind, an item, the webhook or a limit is bad. Items not started
        `expires_after_s` after now end `expired`. On PostgreSQL `items` is read in the
        store's worker thread."""
        handler = self.registry.require(kind)
        hook = _webhook(webhook)
        _check_metadata(metadata)
        _check_limits(max_attempts=max_attempts, item_timeout_s=item_timeout_s,
                      concurrency=concurrency, expires_after_s=expires_after_s)

        def insert() -> Batch:
            now = self.now()
            row = self.store.batch_insert(
                tenant=tenant, kind=kind, items=items, now=now, metadata=metadata,
                webhook=hook, max_attempts=max_attempts or handler.max_attempts
                or self.settings.default_max_attempts, item_timeout_s=item_timeout_s,
                concurrency=concurrency, input_file_id=input_file_id,
                idempotency=idempotency,
                expires_at=None if expires_after_s is None else now + expires_after_s,
                dialect=dialect, dialect_data=dialect_data, id_prefix=id_prefix,
                max_queued=self.settings.max_queued_items)
            if hook is not None:
                self.webhook_secret(tenant)  # deliveries are signed with the tenant's secret
            return self.store.batch_get(row.id)

        batch = await self.store.call(insert)
        if self.runner is not None:
            self.runner.notify(kind)
        return batch

    async def get(self, batch_id: str, *, tenant: str | None = None) -> Batch:
        return await self.store.call(self.store.batch_get, batch_id, tenant)

    async def wait(self, batch_id: str, *, timeout: float | None = None,
                   poll_s: float = 0.05) -> Batch:
        """Poll until the batch is terminal (or `timeout` passes: TimeoutError)."""
        with anyio.fail_after(timeout):
            while (await self.store.call(self.store.batch_status, batch_id)
                   not in models.BATCH_TERMINAL):
                await anyio.sleep(poll_s)
        return await self.store.call(self.store.batch_get, batch_id)

    async def list_batches(self, status: str | None = None, limit: int = 100, *,
                           after: str | None = None, tenant: str | None = None) -> list[Batch]:
        """Batches, newest first."""
        return (await self.store.call(self.store.batches_list, tenant, status=status,
                                      limit=limit, after=after))[0]

    async def cancel(self, batch_id: str, *, tenant: str | None = None) -> Batch:
        batch, seq = await self.store.call(
            lambda: self.store.batch_cancel(batch_id, tenant, self.now()))
        if self.runner is not None:
            self.runner.cancel_local(seq)
        return batch

    async def results(self, batch_id: str, *, tenant: str | None = None
                      ) -> AsyncIterator[Result]:
        """Terminal items in submission order, read a page at a time."""
        async for rows in self.result_pages(batch_id, tenant=tenant):
            for _, seq, entry_id, status, out, err, attempts in rows:
                yield Result(id=item_id(seq), entry_id=entry_id, status=status,
                             output=None if out is None else _decode(out),
                             error=None if err is None else _decode(err, type=ItemError),
                             attempts=attempts)

    async def result_pages(self, batch_id: str, *, tenant: str | None = None
                           ) -> AsyncIterator[list[tuple]]:
        """Raw result rows, RESULTS_PAGE at a time (the HTTP API streams these), each
        page one `call`; the first comes with the batch's lookup (NotFound)."""
        def first() -> tuple[int, list[tuple]]:
            seq = self.store.batch_seq(batch_id, tenant)
            return seq, self.store.results_page(seq, -1, RESULTS_PAGE)

        seq, rows = await self.store.call(first)
        while rows:
            yield rows
            await anyio.sleep(0)  # let other tasks in between pages (SQLite never waits)
            rows = await self.store.call(self.store.results_page, seq, rows[-1][0],
                                         RESULTS_PAGE)

    async def deliveries(self, batch_id: str, *, limit: int = 100, after: str | None = None,
                         tenant: str | None = None) -> list[models.Delivery]:
        """A page of the batch's webhook deliveries, oldest first, each with its attempts;
        `after` is the id of the last delivery of the previous page."""
        return (await self.store.call(self.deliveries_page, batch_id, tenant, limit=limit,
                                      after=after))[0]

    def deliveries_page(self, batch_id: str, tenant: str | None, *, limit: int,
                        after: str | None) -> tuple[list[models.Delivery], bool]:
        """A page of the batch's deliveries and whether more follow (store reads: code on
        the loop runs this through `store.call`)."""
        seq = self.store.batch_seq(batch_id, tenant)
        return self.store.deliveries_page(seq, limit=limit, after=after)

    async def redeliver(self, delivery_id: str, *, tenant: str | None = None
                        ) -> models.Delivery:
        """Send a delivery again: same frozen bytes, same webhook-id, not automatic."""
        return await self.store.call(
            lambda: self.store.delivery_redeliver(delivery_id, tenant, self.now()))

    def rotate_secret(self, tenant: str = DEFAULT_TENANT, overlap_s: float = 86400.0
                      ) -> models.SecretRotated:
        """A new primary signing secret; the previous one keeps signing for `overlap_s`
        (at most 7 days), and any older one stops now."""
        if not 0 <= overlap_s <= models.MAX_OVERLAP_S:
            message = f"must be 0 to {models.MAX_OVERLAP_S:g} seconds"
            raise InvalidInput(f"overlap_s {message}", [{"field": "overlap_s",
                                                          "message": message}])
        secret, secret_id = signing.new_secret(), new_id("secret")
        previous, expires = self.store.secret_rotate(tenant, secret_id, secret, overlap_s,
                                                     self.now())
        return models.SecretRotated(secret_id, secret, previous, models.to_datetime(expires))

    # -- webhook endpoints (tenant level) ----------

    def create_endpoint(self, tenant: str, name: str, url: str, event_types: list[str],
                        allowed: Iterable[str] = models.BATCH_EVENTS
                        ) -> tuple[EndpointRow, str]:
        """A webhook endpoint that receives the `event_types` of all the tenant's batches,
        and its signing secret (shown only now and at rotation)."""
        self._check_endpoint(name, url, event_types, allowed)
        secret = signing.new_secret()
        row = self.store.endpoint_create(tenant, name, url, event_types, new_id("secret"),
                                         secret, self.now())
        return row, secret

    def update_endpoint(self, tenant: str, endpoint_id: str, *, name: str | None = None,
                        url: str | None = None, event_types: list[str] | None = None,
                        allowed: Iterable[str] = models.BATCH_EVENTS) -> EndpointRow:
        row = self.store.endpoint_get(endpoint_id, tenant)
        self._check_endpoint(name or row.name, url or row.url,
                             row.events() if event_types is None else event_types, allowed)
        return self.store.endpoint_update(endpoint_id, tenant, self.now(), name=name, url=url,
                                          event_types=event_types)

    def rotate_endpoint_secret(self, tenant: str, endpoint_id: str, overlap_s: float = 0.0
                               ) -> tuple[EndpointRow, str]:
        """A new signing secret; the old one keeps signing for `overlap_s` (default: none)."""
        secret = signing.new_secret()
        row = self.store.endpoint_rotate(endpoint_id, tenant, new_id("secret"), secret,
                                         overlap_s, self.now())
        return row, secret

    async def test_endpoint(self, tenant: str, endpoint_id: str, payload: bytes) -> int:
        """Send `payload` to the endpoint now, signed, once; the receiver's status code."""
        def target() -> tuple[EndpointRow, list[tuple[str, str]]]:
            row = self.store.endpoint_get(endpoint_id, tenant)
            return row, self.store.secrets_active(tenant, self.now(), row.id)

        row, active = await self.store.call(target)
        if self.deliverer is None:
            raise InvalidInput("webhook delivery is not running on this instance")
        keys = [signing.secret_key(s) for _, s in active]
        status, _, _, error, _ = await self.deliverer.post(row.url, new_id("msg"), payload,
                                                           keys)
        if status is None:
            raise BadRequest(f"the test event could not be delivered: {error}")
        return status

    def endpoint_secret_hint(self, row: EndpointRow) -> str | None:
        """The start and end of the endpoint's primary secret, to tell secrets apart."""
        active = self.store.secrets_active(row.tenant, self.now(), row.id)
        return f"{active[0][1][:10]}…{active[0][1][-4:]}" if active else None

    def _check_endpoint(self, name: str, url: str, event_types: list[str],
                        allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        if not 1 <= len(name) <= 200:
            raise InvalidInput("name must be 1-200 characters",
                               [{"field": "name", "message": "bad length"}])
        _webhook({"url": url})  # http(s), with a host
        if not self.settings.allow_private_webhooks and (reason := literal_blocked(url)):
            raise InvalidInput(f"url is refused: {reason}", [{"field": "url",
                                                               "message": reason}])
        bad = [e for e in event_types if e not in allowed]
        if not event_types or bad:
            message = f"event_types must be one or more of {', '.join(allowed)}"
            raise InvalidInput(message, [{"field": "event_types", "message": message}])

    def webhook_secret(self, tenant: str = DEFAULT_TENANT) -> str:
        """The tenant's primary signing secret (`whsec_…`), created on first use."""
        active = self.store.secrets_active(tenant, self.now())
        return active[0][1] if active else self.rotate_secret(tenant, 0).webhook_secret

    async def create_file(self, data: bytes, *, filename: str | None = None,
                          tenant: str = DEFAULT_TENANT, idempotency: tuple | None = None
                          ) -> models.FileObject:
        """Validate and store a JSONL file of items (one item object per line), for
        `submit(..., input_file_id=file.id)`. Raises InvalidInput naming every bad line."""
        return await store_file(self.store, tenant, filename, data, self.now(), idempotency)

    def asgi(self) -> Any:
        """The Starlette app serving the HTTP API for this instance."""
        from .api import create_app

        return create_app(self)


def _webhook(webhook: dict | models.WebhookIn | None) -> models.WebhookIn | None:
    if webhook is None:
        return None
    if isinstance(webhook, dict):
        try:
            webhook = msgspec.convert(webhook, models.WebhookIn)
        except msgspec.ValidationError as exc:
            raise InvalidInput(f"webhook: {exc}", [{"field": "webhook", "message": str(exc)}]
                               ) from None
    bad = "not an http(s) URL with a host and a valid port"
    try:
        parts = urlsplit(webhook.url)
        ok = parts.scheme in ("http", "https") and parts.hostname and (
            parts.port is None or parts.port > 0)
    except ValueError:  # a bad port or bracketed host: urlsplit and .port raise
        ok = False
    if not ok:
        raise InvalidInput(f"webhook.url is {bad}", [{"field": "webhook.url", "message": bad}])
    return webhook


def _check_metadata(metadata: Any) -> None:
    """A batch's metadata: a JSON object the store can encode and decode again."""
    if metadata is None:
        return
    problem = None if isinstance(metadata, dict) else "must be an object"
    if problem is None:
        try:
            if models.too_deep(models.encoder.encode(metadata)):
                problem = f"nests deeper than {models.MAX_NESTING} levels"
        except (TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:
            problem = f"is not JSON-encodable: {exc}"
    if problem is not None:
        raise InvalidInput(f"metadata {problem}", [{"field": "metadata", "message": problem}])


def _check_limits(**limits: float | None) -> None:
    """The batch's own limits: positive, finite and within models.LIMITS."""
    for name, value in limits.items():
        top = models.LIMITS[name]
        if value is not None and (isinstance(value, bool) or not 0 < value <= top):
            message = f"must be > 0 and <= {top}"
            raise InvalidInput(f"{name} {message}", [{"field": name, "message": message}])


def run_batch(fn: Callable, items: Iterable[Any], *, kind: str = "job", db: str = ":memory:",
              concurrency: int | None = None, timeout: float | None = None,
              max_attempts: int | None = None, **options: Any) -> tuple[Batch, list[Result]]:
    """Run `fn` over `items` to the end and return the batch and its results (sync)."""
    async def main() -> tuple[Batch, list[Result]]:
        mb = Minibatch(db, **options)
        mb.handler(kind, concurrency=concurrency, timeout=timeout, max_attempts=max_attempts)(fn)
        try:
            async with mb:
                batch = await mb.submit(kind, items)
                batch = await mb.wait(batch.id)
                return batch, [r async for r in mb.results(batch.id)]
        finally:
            mb.close()
    return anyio.run(main)
