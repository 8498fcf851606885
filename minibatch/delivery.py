"""Webhook delivery: send each due delivery's frozen bytes, record the attempt, schedule
the next one; and the destination guard that refuses private addresses.

Runs beside the item loops in the same task group but shares nothing with them except
the database, so a slow or dead receiver never slows items. Attempts are written in
groups by the recorder, as the completer writes item outcomes. Every store call goes
through `store.call` (a worker thread on PostgreSQL), one at a time (`_store_turn`).
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import NamedTuple

import aiohttp
import anyio
import yarl

from . import signing
from .config import Settings
from .errors import StorageUnavailable
from .handlers import JITTER
from .runner import pause_after_error
from .store import Store

log = logging.getLogger("minibatch.delivery")
RESPONSE_READ_LIMIT = 64 * 1024
RESPONSE_STORE_LIMIT = 1024
RETRY_AFTER_CAP_S = 24 * 3600.0
LEASE_MARGIN_S = 5.0  # a claimed delivery is due again this long after its timeout

# IPv6 prefixes whose addresses embed an IPv4 address in their last 32 bits: NAT64
# (well-known and local-use), IPv4-translated, and IPv4-compatible.
_EMBEDDING = [ipaddress.ip_network(n) for n in
              ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96")]


class BlockedDestination(Exception):
    pass


def blocked_reason(address: str) -> str | None:
    """Why this address may not receive webhooks, or None if it may."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and int(ip) > 1 and any(ip in net for net in _EMBEDDING):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and blocked_reason(str(embedded)):
            return f"{ip} embeds the refused IPv4 address {embedded}"
        if ip.is_site_local:
            return f"{ip} is a (deprecated) site-local address"
    if ip.is_multicast or not ip.is_global:
        return f"{ip} is not a public address"
    if isinstance(ip, ipaddress.IPv4Address) and ip.packed[0] in (0, 255):
        return f"{ip} is a reserved address"
    return None


def blocked_name(host: str) -> str | None:
    """Why a host name (not an address) is refused: `localhost` and `*.localhost` (RFC
    6761), in any case, with or without a trailing dot."""
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return f"{host} is a loopback name"
    return None


def guarded_socket(addr_info: tuple) -> socket.socket:
    """The connector's socket factory: the last check before every connection, on the
    exact address it is about to reach. aiohttp skips the resolver for IP literals, so
    however a URL spells its host, the address is checked here."""
    family, type_, proto, _, sockaddr = addr_info
    reason = blocked_reason(sockaddr[0])
    if reason:
        raise BlockedDestination(f"refused destination: {reason}")
    return socket.socket(family=family, type=type_, proto=proto)


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """Resolves a host and keeps only allowed addresses: aiohttp then connects to exactly
    those, so a second DNS answer cannot swap in a private address."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list:
        try:
            answers = await self._inner.resolve(host, port, family)
        except OSError:
            # `localhost.` may not resolve here yet reach loopback elsewhere: refused, not
            # a connection error, so the delivery is not retried for hours.
            if reason := blocked_name(host):
                raise BlockedDestination(f"refused destination: {reason}") from None
            raise
        allowed = [a for a in answers if blocked_reason(a["host"]) is None]
        if not allowed:
            raise BlockedDestination(
                f"{host} resolves only to refused addresses:"
                f" {', '.join(sorted({a['host'] for a in answers}))}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def connector(limit: int, limit_per_host: int = 0, *, allow_private: bool
              ) -> aiohttp.TCPConnector:
    """A connector that refuses private destinations twice over: names by the resolver
    (so only allowed addresses are tried), every address by the socket factory."""
    if allow_private:
        return aiohttp.TCPConnector(limit=limit, limit_per_host=limit_per_host)
    return aiohttp.TCPConnector(limit=limit, limit_per_host=limit_per_host,
                                resolver=GuardedResolver(), socket_factory=guarded_socket)


class AttemptRecord(NamedTuple):
    seq: int
    attempt_number: int
    is_automatic: bool
    status_code: int | None
    response_body: str | None
    response_time_ms: int
    error: str | None
    secret_id: str | None
    now: float
    next_attempt_at: float | None
    failure: str | None
    gone: bool


def retry_after_s(value: str | None, now: float) -> float:
    """Seconds a `Retry-After` header asks for (delta-seconds or HTTP-date), capped at 24 h."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
        if not math.isfinite(seconds):
            return 0.0
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, OverflowError):  # a receiver's header: anything
            return 0.0
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


def next_delay(schedule: tuple[float, ...], attempt_number: int, retry_after: float) -> float:
    """Wait before attempt `attempt_number + 1`: the schedule with +-20 % jitter, never
    shorter than what the receiver asked for. A delivery made under a longer schedule
    (before a restart with a shorter one) keeps the new schedule's last delay."""
    step = schedule[min(attempt_number, len(schedule) - 1)]
    return max(step * JITTER.uniform(0.8, 1.2), retry_after)


class Deliverer:
    def __init__(self, store: Store, settings: Settings, now: Callable[[], float]) -> None:
        self.store = store
        self.settings = settings
        self.now = now
        self.in_flight = 0
        self.records: list[AttemptRecord] = []
        self.record_ready = anyio.Event()
        self.slot_free = anyio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.closing = False
        # The deliverer's store calls one at a time: a claim must come after every attempt
        # recorded before it (a 410 ends other deliveries to its URL), as it did when the
        # calls ran on the loop. Taken at once when free.
        self._store_turn = anyio.Lock(fast_acquire=True)

    async def run(self, task_group: anyio.abc.TaskGroup) -> None:
        s = self.settings
        self.session = aiohttp.ClientSession(
            connector=connector(s.webhook_concurrency, s.webhook_per_host,
                                allow_private=s.allow_private_webhooks),
            timeout=aiohttp.ClientTimeout(total=s.webhook_timeout_s),
            auto_decompress=False, skip_auto_headers=("User-Agent",))
        await task_group.start(self._hold_sends)
        task_group.start_soon(self.claimer)
        task_group.start_soon(self.recorder)

    async def _hold_sends(self, *, task_status: anyio.abc.TaskStatus) -> None:
        """Own the task group of in-flight sends, so closing can cancel just those."""
        async with anyio.create_task_group() as sends:
            self._sends = sends
            task_status.started()
            await anyio.sleep_forever()

    async def close(self) -> None:
        """Stop sending. An attempt cut short is not recorded; its delivery is due again
        once its lease passes, here or after a restart."""
        self.closing = True
        self._sends.cancel_scope.cancel()
        await anyio.sleep(0)
        await self._flush()
        if self.session is not None:
            await self.session.close()

    # -- claimer ----------

    async def claimer(self) -> None:
        while True:
            try:
                started = await self.deliver_once()
            except StorageUnavailable:
                await anyio.sleep(1.0)
                continue
            except Exception:
                await pause_after_error(log, "webhook claimer")
                continue
            if self.in_flight >= self.settings.webhook_concurrency:
                await self.slot_free.wait()
                self.slot_free = anyio.Event()
            elif not started:
                await anyio.sleep(self.settings.poll_interval_s / 2)

    async def deliver_once(self) -> int:
        """Claim due deliveries for the free slots and start sending them.

        One store call: the attempts not yet recorded, the claim, the signing secrets.
        Sends only end while it is under way, so `room` still fits; but a close may have
        begun: then nothing is sent, and the deliveries claimed are due again once their
        lease passes, as an attempt cut short is."""
        room = self.settings.webhook_concurrency - self.in_flight
        if room <= 0 or self.closing:
            return 0
        store, lease = self.store, self.settings.webhook_timeout_s + LEASE_MARGIN_S
        recorded = False

        def claim(records: list[AttemptRecord], now: float
                  ) -> tuple[list[tuple], dict[tuple[str, str | None], list]]:
            nonlocal recorded
            # Attempts not yet recorded go first: a 410 among them ends the batch's other
            # pending deliveries to that URL, which this claim must then not send.
            if records:
                store.deliveries_record(records)
            recorded = True
            due = store.deliveries_claim(now, room, lease)
            # Signed with the tenant's secrets, or those of the webhook endpoint it goes to.
            active: dict[tuple[str, str | None], list] = {}
            for row in due:
                owner = (row[2], row[9])
                if owner not in active:
                    active[owner] = store.secrets_active(owner[0], now, owner[1])
            return due, active

        async with self._store_turn:
            records, self.records = self.records, []
            try:
                due, active = await self.store.call(claim, records, self.now())
            except BaseException:
                if not recorded:
                    self.records[:0] = records
                raise
        if self.closing:
            return 0
        keys_of = {owner: (secrets[0][0] if secrets else None,
                           [signing.secret_key(s) for _, s in secrets])
                   for owner, secrets in active.items()}
        for row in due:
            self.in_flight += 1
            self._sends.start_soon(self._send, row, *keys_of[row[2], row[9]])
        return len(due)

    # -- one attempt ----------

    async def _send(self, row: tuple, secret_id: str | None, keys: list[bytes]) -> None:
        """One attempt; `keys` are the tenant's active signing keys, primary first."""
        seq, msg_id, _, url, payload, attempt_count, max_attempts, _, automatic, _ = row
        attempt = attempt_count + 1
        started = time.perf_counter()
        try:
            status, body, retry_after, error, failure = await self.post(
                url, msg_id, payload, keys)
        finally:
            self.in_flight -= 1
            self.slot_free.set()
        now = self.now()
        elapsed = int((time.perf_counter() - started) * 1000)
        gone = status == 410
        if gone:
            failure = "endpoint_gone"
        final = failure in ("blocked_destination", "endpoint_gone") or attempt >= max_attempts
        next_at = None
        if failure is not None and not final:
            next_at = now + next_delay(self.settings.webhook_retry_schedule, attempt,
                                       retry_after_s(retry_after, now))
        self.records.append(AttemptRecord(
            seq, attempt, bool(automatic), status, body, elapsed, error,
            secret_id, now, next_at, failure, gone))
        self.record_ready.set()

    async def post(self, url: str, msg_id: str, payload: bytes, keys: list[bytes]
                    ) -> tuple[int | None, str | None, str | None, str | None, str | None]:
        """POST once: (status, body, retry_after, error, failure_reason_code or None)."""
        assert self.session is not None
        if not self.settings.allow_private_webhooks:
            reason = literal_blocked(url)
            if reason:
                return None, None, None, reason, "blocked_destination"
        headers = signing.headers(keys, msg_id, int(self.now()), payload)
        try:
            async with self.session.post(url, data=payload, headers=headers,
                                         allow_redirects=False) as resp:
                raw = await read_capped(resp, RESPONSE_READ_LIMIT)
                # Shown as text: bad UTF-8 and NUL (which no PostgreSQL text holds) as U+FFFD
                body = raw[:RESPONSE_STORE_LIMIT].decode("utf-8", "replace").replace(
                    "\x00", "\ufffd")
                if 200 <= resp.status < 300:
                    return resp.status, body, None, None, None
                return (resp.status, body, resp.headers.get("Retry-After"),
                        f"HTTP {resp.status}", "http_status")
        except BlockedDestination as exc:
            return None, None, None, str(exc), "blocked_destination"
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return None, None, None, f"no response within {self.settings.webhook_timeout_s} s", \
                "timeout"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return None, None, None, f"{type(exc).__name__}: {exc}"[:500], "connection_error"
        except Exception as exc:  # an attempt's surprise is that attempt's failure, no more
            log.exception("sending delivery %s failed unexpectedly", msg_id)
            return None, None, None, f"{type(exc).__name__}: {exc}"[:500], "connection_error"

    # -- recorder ----------

    async def recorder(self) -> None:
        while True:
            await self.record_ready.wait()
            self.record_ready = anyio.Event()
            try:
                await self._flush()
            except StorageUnavailable:
                self.record_ready.set()
                await anyio.sleep(1.0)
            except Exception:
                self.record_ready.set()
                await pause_after_error(log, "attempt recorder")

    async def _flush(self) -> None:
        """Record the attempts gathered so far; those of a failed write go back before
        the ones gathered meanwhile."""
        async with self._store_turn:
            if self.records:
                records, self.records = self.records, []
                try:
                    await self.store.call(self.store.deliveries_record, records)
                except BaseException:
                    self.records[:0] = records
                    raise


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body up to its end or `limit` bytes, whichever comes first (the per-attempt
    timeout bounds a body that trickles forever)."""
    chunks, size = [], 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def literal_blocked(url: str) -> str | None:
    """Why the host of `url`, read as the HTTP client reads it, is refused; None if it is
    a public address or a name (names are checked on what they resolve to).

    yarl normalizes the host first (Unicode digits and dots, case, IDNA), so the check
    sees the host aiohttp will connect to; numeric spellings such as `2130706433` or
    `127.1`, which aiohttp refuses as URLs, are read as a resolver would. The connector's
    socket factory checks again, whatever this misses."""
    try:
        host = (yarl.URL(url).host or "").rstrip(".")
    except (ValueError, TypeError, IndexError):  # yarl raises IndexError for `http://[]@`
        return None  # not a URL the client can send to either
    try:
        address = str(ipaddress.ip_address(host.split("%")[0]))
    except ValueError:
        try:  # inet_aton reads the classic spellings: 127.1, 0x7f000001, 0177.0.0.1, ...
            address = str(ipaddress.IPv4Address(socket.inet_aton(host)))
        except (OSError, ValueError):
            return None
    reason = blocked_reason(address)
    return f"refused destination: {reason}" if reason else None
