"""The HTTP server: uvicorn, configured with minibatch's limits.

`server_config` builds the one uvicorn Config that `minibatch serve` and the test server
both run, so every request meets the same limits (the `Settings` fields):

- `max_header_bytes`: the request line and headers; 431 beyond, then the connection closes.
- `request_timeout_s`: a request (line, headers and body) must arrive whole within this
  time of its first byte, and a fresh connection's first request within this time of the
  connect; otherwise the connection is dropped (408 first when nothing else is on the wire).
- `max_connections`: open connections; a request beyond them gets uvicorn's 503.

uvicorn bounds none of the first two for httptools (its `h11_max_incomplete_event_size` is
h11's only), so `LimitedHttpToolsProtocol` adds them to uvicorn's httptools protocol. Idle
keep-alive between requests stays uvicorn's own `timeout_keep_alive` (5 s). This module
owns no routes and no state of its own; it must stay off the hot path beyond one `len()`
and a compare per read.
"""

from __future__ import annotations

import asyncio
import http
from typing import TYPE_CHECKING, Any, cast

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from . import models

if TYPE_CHECKING:
    from .app import Minibatch
    from .config import Settings

PROBLEM = b"application/problem+json"


def _problem(status: int, detail: str) -> bytes:
    title = http.HTTPStatus(status).phrase
    return models.encoder.encode(models.Problem(
        type="https://minibatch.dev/problems/" + title.lower().replace(" ", "-"),
        title=title, status=status, detail=detail))


REFUSALS = {
    431: _problem(431, "the request line and headers are over the server's limit"),
    408: _problem(408, "the request did not arrive whole in time"),
}


def _refusal_headers(status: int) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", PROBLEM), (b"content-length", b"%d" % len(REFUSALS[status])),
            (b"connection", b"close")]


async def header_fields_too_large(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app that answers a request whose whole head arrived over the limit."""
    await send({"type": "http.response.start", "status": 431,
                "headers": _refusal_headers(431)})
    await send({"type": "http.response.body", "body": REFUSALS[431]})


class CoalescedWrites:
    """A connection's transport whose writes within one turn of the event loop leave as
    one write. uvicorn writes a response's head and its body separately, and each write
    is a system call that, on loopback, also runs the peer's receive path: one write
    instead of two cut a polled GET's CPU by about a third (bench/api.py). Past
    FLUSH_AT bytes pending, a write goes at once, so a body streamed without a pause
    still meets the transport's flow control. Everything else is the transport's own;
    `close` sends what is pending first."""

    FLUSH_AT = 64 * 1024
    __slots__ = ("_loop", "_pending", "_pending_bytes", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= self.FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on each request's head and on the time
    the request takes to arrive. `limited_protocol` sets the two class attributes.

    The head is counted per read while it is incomplete (`_in_head`): a read that ends it
    may carry body bytes too, so a count past the limit is settled by `_head_size`, the
    head as parsed. A head that begins inside a read already counted for the request
    before it (pipelining) is measured as parsed too, and its unfinished part from the
    next read on, so an unfinished head never holds more than the limit plus one read.
    """

    max_header_bytes: int
    request_timeout_s: float

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # the next bytes are a request line or headers
        self._head_bytes = 0  # bytes read since this head began, body bytes of its last read too
        self._head_unmeasured = False  # this head began inside a read counted already
        self._deadline: float | None = None  # when the request now arriving must be whole
        self._request_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, CoalescedWrites(transport, self.loop)))
        # The first request's clock starts at the connect: a silent connection is dropped.
        self._expect_request()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
            self._head_unmeasured = False
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_header_bytes:
            self._close_with(431)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._expect_request()

    def on_headers_complete(self) -> None:
        self._in_head = False
        over = self._head_bytes > self.max_header_bytes or self._head_unmeasured
        if not (over and self._head_size() > self.max_header_bytes):
            super().on_headers_complete()
            return
        # uvicorn starts the cycle with `self.app`: swapping it in for this one request
        # answers 431 in order behind any pipelined response, and closes after it.
        app, self.app = self.app, header_fields_too_large
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        self._deadline = None
        self._in_head, self._head_bytes, self._head_unmeasured = True, 0, True
        super().on_message_complete()

    def _head_size(self) -> int:
        """The head as parsed, in the usual spelling: `METHOD url HTTP/1.1`, each
        `name: value`, each line ending in CRLF, and the blank line."""
        lines = sum(len(name) + len(value) + 4 for name, value in self.headers)
        return len(self.parser.get_method()) + len(self.url) + 14 + lines

    def _expect_request(self) -> None:
        self._deadline = self.loop.time() + self.request_timeout_s
        if self._request_timer is None:
            self._request_timer = self.loop.call_later(self.request_timeout_s,
                                                       self._check_deadline)

    def _check_deadline(self) -> None:
        """The request timer. It lapses when no request is arriving and re-arms for the
        rest of the one that is, so a busy keep-alive connection pays one `call_later`
        per `request_timeout_s` rather than one per request (a call_later and a cancel
        per request cost uvloop about 1 µs, 2% of a /healthz request)."""
        self._request_timer = None
        if self._deadline is None:
            return
        left = self._deadline - self.loop.time()
        if left > 0:
            self._request_timer = self.loop.call_later(left, self._check_deadline)
        else:
            self._close_with(408)

    def _close_with(self, status: int) -> None:
        """Answer `status` and close. While a request is still being answered (its body
        is arriving, or a pipelined response is on the wire) a status line would land
        inside that exchange, so then the connection only closes."""
        if self.transport.is_closing():
            return
        if self._in_head and (self.cycle is None or self.cycle.response_complete):
            headers = self.server_state.default_headers + _refusal_headers(status)
            self.transport.write(b"".join([STATUS_LINE[status],
                                           *(b"%s: %s\r\n" % pair for pair in headers),
                                           b"\r\n", REFUSALS[status]]))
        self.transport.close()


def limited_protocol(settings: Settings) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=`, bound to these settings' limits."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {
        "max_header_bytes": settings.max_header_bytes,
        "request_timeout_s": settings.request_timeout_s,
    })


def server_config(mb: Minibatch, host: str, port: int, *,
                  log_level: str = "info") -> uvicorn.Config:
    """The uvicorn Config serving `mb`'s API on host:port under `mb.settings`' limits.

    The access log is minibatch's own (logs.RequestLog, with the request id), so
    uvicorn's is off. lifespan is off because the caller runs `async with mb` around the
    server itself; ws is off because minibatch serves no WebSockets, and an upgrade would
    hand the socket to a protocol without these limits.
    """
    return uvicorn.Config(
        mb.asgi(), host=host, port=port, log_level=log_level, access_log=False,
        log_config=None,  # uvicorn's lines go through minibatch's handler (logs.configure)
        lifespan="off", ws="none", http=limited_protocol(mb.settings),
        # uvicorn refuses when `open connections >= limit_concurrency`, counting the one
        # asking: + 1 lets max_connections be open and served, and 503s the next.
        limit_concurrency=mb.settings.max_connections + 1)
