"""What runs a dialect's requests: an upstream model server, or a Python handler.

A dialect batch's items are its requests' bodies, of the kind `openai:<path>` (e.g.
`openai:/v1/chat/completions`) or `anthropic:/v1/messages`. Whatever runs them answers
with a response envelope `{status_code, request_id, body}`, which is the item's output and
what the dialect's result files show. A cancel lets the requests already sent finish.

`Upstream` sends each body to a model server over one pooled aiohttp session: an
OpenAI-compatible one (vLLM, llama.cpp, Ollama, ...) at the line's path below `/v1`, an
Anthropic-compatible one at `/v1/messages`, or, for Anthropic requests with only an OpenAI
upstream, translated to `/chat/completions` and back (translate.py). Connection errors,
429 and 5xx are retried by the engine (with its backoff, never sooner than `Retry-After`);
another 4xx is final. The upstream is the operator's configuration, so no private-address
guard applies to it.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from . import translate
from .delivery import read_capped, retry_after_s
from .errors import Fail, Retry
from .handlers import DECLARED
from .models import Item

if TYPE_CHECKING:
    from .app import Minibatch

OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                    "/v1/responses", "/v1/moderations")
ANTHROPIC_KIND = "anthropic:/v1/messages"
ANTHROPIC_VERSION = "2023-06-01"
RESPONSE_LIMIT = 16 * 1024 * 1024  # an upstream answer larger than this is cut
_decode = msgspec.json.decode
_encode = msgspec.json.encode


def openai_kind(endpoint: str) -> str:
    """The engine's kind for the requests of an OpenAI batch of `endpoint`."""
    return f"openai:{endpoint}"


def envelope(status: int, body: Any, request_id: str | None = None) -> dict[str, Any]:
    return {"status_code": status, "request_id": request_id or new_request_id(), "body": body}


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


class Upstream:
    """A model server at `base_url`: one pooled session, `concurrency` requests at once."""

    def __init__(self, base_url: str, headers: dict[str, str], concurrency: int,
                 timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json", **headers}
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.session: aiohttp.ClientSession | None = None

    def kind(self, path: str) -> Callable[[Item], Any]:
        """The handler that POSTs each item's input to `path` below the base URL."""
        async def run(item: Item) -> dict[str, Any]:
            return await self.post(path, item.input)

        return run

    def translated_kind(self) -> Callable[[Item], Any]:
        """The handler of Anthropic requests on this OpenAI-compatible server."""
        async def run(item: Item) -> dict[str, Any]:
            answer = await self.post("/chat/completions", translate.chat_body(item.input))
            return envelope(200, translate.message_of(answer["body"], item.input),
                            answer["request_id"])

        return run

    async def post(self, path: str, body: Any) -> dict[str, Any]:
        """One attempt of one request; its envelope, or Retry/Fail carrying it."""
        try:
            async with self._session().post(self.base_url + path, data=_encode(body),
                                            headers=self.headers,
                                            allow_redirects=False) as resp:
                raw = await read_capped(resp, RESPONSE_LIMIT)
                request_id = resp.headers.get("x-request-id") or resp.headers.get(
                    "request-id")
                answer = envelope(resp.status, _body(raw), request_id)
                if resp.status == 429 or resp.status >= 500:
                    wait = retry_after_s(resp.headers.get("Retry-After"), time.time())
                    raise Retry(after=wait or None, message=f"upstream HTTP {resp.status}",
                                output=answer)
                if resp.status >= 300:
                    raise Fail(f"upstream HTTP {resp.status}", code="http_status",
                               output=answer)
                return answer
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Retry(message=f"upstream unreachable: {type(exc).__name__}: {exc}") from None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                skip_auto_headers=("User-Agent",))
        return self.session

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def _body(raw: bytes) -> Any:
    """An upstream body as JSON, or as text when it is not JSON."""
    try:
        return _decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return raw.decode("utf-8", "replace")


def as_request_handler(fn: Callable[[Item], Any]) -> Callable[[Item], Any]:
    """A Python handler of a dialect's requests: it returns the response body (status
    200), and raises Fail/Retry as any handler. A sync one stays sync (it runs in a
    thread), an async one async."""
    if inspect.iscoroutinefunction(fn):
        async def run_async(item: Item) -> dict[str, Any]:
            return envelope(200, await fn(item))
        return run_async

    def run_sync(item: Item) -> dict[str, Any]:
        return envelope(200, fn(item))
    return run_sync


def openai_handler(endpoint: str, *, concurrency: int | None = None,
                   timeout: float | None = None, max_attempts: int | None = None
                   ) -> Callable:
    """Declare, in a `--handlers` module, the Python handler of an OpenAI endpoint's
    requests (e.g. "/v1/chat/completions"): it gets an Item whose input is the line's
    body and returns the response body."""
    return _declare(openai_kind(endpoint), concurrency, timeout, max_attempts)


def anthropic_handler(*, concurrency: int | None = None, timeout: float | None = None,
                      max_attempts: int | None = None) -> Callable:
    """Declare, in a `--handlers` module, the Python handler of Anthropic Message Batches
    requests: it gets an Item whose input is a request's `params` and returns a Message."""
    return _declare(ANTHROPIC_KIND, concurrency, timeout, max_attempts)


def _declare(kind: str, concurrency: int | None, timeout: float | None,
             max_attempts: int | None) -> Callable:
    def declare(fn: Callable) -> Callable:
        DECLARED.append((kind, as_request_handler(fn),
                         {"concurrency": concurrency, "timeout": timeout,
                          "max_attempts": max_attempts, "interruptible": False}))
        return fn
    return declare


def register_upstream(mb: Minibatch) -> None:
    """Run the dialects' requests on the configured upstreams: every OpenAI endpoint on
    `openai_upstream`; Anthropic requests on `anthropic_upstream`, or translated onto
    `openai_upstream` when only that is set. A Python handler registered later for a kind
    takes its place."""
    s = mb.settings
    upstreams = []
    if s.openai_upstream is not None:
        openai = Upstream(s.openai_upstream, _bearer(s.openai_upstream_key),
                          s.openai_upstream_concurrency, s.openai_upstream_timeout_s)
        upstreams.append(openai)
        for endpoint in OPENAI_ENDPOINTS:
            mb.handler(openai_kind(endpoint), concurrency=s.openai_upstream_concurrency,
                       interruptible=False)(openai.kind(endpoint.removeprefix("/v1")))
        if s.anthropic_upstream is None:
            mb.handler(ANTHROPIC_KIND, concurrency=s.openai_upstream_concurrency,
                       interruptible=False)(openai.translated_kind())
    if s.anthropic_upstream is not None:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if s.anthropic_upstream_key:
            headers["x-api-key"] = s.anthropic_upstream_key
        anthropic = Upstream(s.anthropic_upstream, headers, s.anthropic_upstream_concurrency,
                             s.openai_upstream_timeout_s)
        upstreams.append(anthropic)
        mb.handler(ANTHROPIC_KIND, concurrency=s.anthropic_upstream_concurrency,
                   interruptible=False)(anthropic.kind("/v1/messages"))
    for upstream in upstreams:
        mb.on_close(upstream.aclose)


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}
