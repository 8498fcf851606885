"""Built-in kinds for serving without code: `echo`, `sleep`, `http`.

`http` sends an item's `body` as JSON to its `url`, with the kind's concurrency bound and a
timeout; connection errors, 5xx and 429 are retried (honouring `Retry-After`), other 4xx
fail the item. Its destinations follow the webhook rule on private addresses.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import msgspec

from .delivery import BlockedDestination, connector, literal_blocked, read_capped, retry_after_s
from .errors import Fail, Retry
from .models import Item

if TYPE_CHECKING:
    from .app import Minibatch

HTTP_TIMEOUT_S = 30.0
HTTP_CONCURRENCY = 32
MAX_SLEEP_S = 3600.0
RESPONSE_LIMIT = 10 * 1024 * 1024


class HttpInput(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    body: Any = None
    method: str = "POST"
    headers: dict[str, str] = {}


ECHO_GROUP = 100  # items per call of `echo`


async def echo(items: list[Item]) -> list[Any]:
    """Output = input, a group of items per call (a no-op item costs less than its
    call)."""
    return [item.input for item in items]


async def sleep(item: Item) -> dict:
    seconds = item.input.get("seconds") if isinstance(item.input, dict) else None
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not (
            0 <= seconds <= MAX_SLEEP_S):
        raise Fail(f"input must be {{\"seconds\": 0..{MAX_SLEEP_S:g}}}", code="bad_input")
    await anyio.sleep(seconds)
    return {"slept": seconds}


class HttpKind:
    """The `http` kind: one pooled aiohttp session, opened on first use."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, item: Item) -> dict:
        try:
            spec = msgspec.convert(item.input, HttpInput)
        except msgspec.ValidationError as exc:
            raise Fail(f"http input: {exc}", code="bad_input") from None
        if not spec.url.startswith(("http://", "https://")):
            raise Fail("http input: url must be http(s)", code="bad_input")
        if not self.allow_private and (reason := literal_blocked(spec.url)):
            raise Fail(reason, code="blocked_destination")
        try:
            async with self._session().request(
                    spec.method, spec.url, json=spec.body, headers=spec.headers,
                    allow_redirects=False) as resp:
                raw = await read_capped(resp, RESPONSE_LIMIT)
                if resp.status == 429 or resp.status >= 500:
                    wait = retry_after_s(resp.headers.get("Retry-After"), time.time())
                    raise Retry(after=wait or None, message=f"HTTP {resp.status}")
                if resp.status >= 400:
                    raise Fail(f"HTTP {resp.status}: {raw[:500].decode('utf-8', 'replace')}",
                               code="http_status")
        except BlockedDestination as exc:
            raise Fail(str(exc), code="blocked_destination") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Retry(message=f"{type(exc).__name__}: {exc}") from None
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            body = raw.decode("utf-8", "replace")
        return {"status": resp.status, "body": body}

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=connector(HTTP_CONCURRENCY, allow_private=self.allow_private),
                timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))
        return self.session

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


def register_builtin_kinds(mb: Minibatch) -> None:
    """Add `echo`, `sleep` and `http` to `mb` (kinds already registered are kept)."""
    http = HttpKind(mb.settings.allow_private_webhooks)
    for kind, fn, concurrency, group in (("echo", echo, 4, ECHO_GROUP),
                                         ("sleep", sleep, 1000, None),
                                         ("http", http, HTTP_CONCURRENCY, None)):
        if mb.registry.get(kind) is None:
            mb.handler(kind, concurrency=concurrency, group=group)(fn)
    mb.on_close(http.aclose)
