"""Webhook delivery, piece by piece, where mutation testing found the other tests blind
(issue 11): the guard's exact verdicts on boundary addresses, `read_capped` and the read
limit against real responses, the status range, error caps and logging of one attempt,
and the Deliverer's slots, lease, close and loops one pass at a time, under an injected
clock, over a real SqliteStore and a real receiver on 127.0.0.1.

Waits are on observed state with generous deadlines; time is bounded from below only
(or by the test's own measure of the same span), never by a fixed upper bound.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable

import aiohttp
import anyio
import pytest

from minibatch.config import make_settings
from minibatch.delivery import (
    BlockedDestination,
    Deliverer,
    GuardedResolver,
    blocked_name,
    blocked_reason,
    connector,
    guarded_socket,
    literal_blocked,
    read_capped,
)
from minibatch.errors import StorageUnavailable
from minibatch.models import WebhookIn
from minibatch.store import Outcome, Store, open_store
from tests.receiver import Receiver

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0
LIMIT = 64 * 1024  # RESPONSE_READ_LIMIT, written out: the mutants change the module's


async def until(condition: Callable[[], object], timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


class Gated(Receiver):
    """The test receiver with a few more actions, each let through by the test:
    ("gate",) waits for `let_one()` and answers 200; ("body", n) a 200 of n bytes;
    ("split", first, total) a 200 declaring `total` bytes that sends `first` of them,
    then the rest once let through (the time it sent them is kept in `rest_sent_at`);
    ("gzip", status, raw) a gzip-encoded answer of `raw`."""

    def __init__(self, script: list | None = None, default: object = 200) -> None:
        super().__init__(script, default)
        self.thread = threading.Thread(  # shut down in 0.05 s, not serve_forever's 0.5
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.passes = threading.Semaphore(0)
        self.first_sent = threading.Event()
        self.rest_sent_at: list[float] = []

    def let_one(self) -> None:
        self.passes.release()

    def act(self, h, action) -> None:
        kind = action[0] if isinstance(action, tuple) else None
        if kind == "gate":
            self.passes.acquire(timeout=60)
            self.reply(h, 200, b"ok")
        elif kind == "body":
            self.reply(h, 200, b"b" * action[1])
        elif kind == "split":
            _, first, total = action
            h.send_response(200)
            h.send_header("Content-Length", str(total))
            h.end_headers()
            h.wfile.write(b"a" * first)
            h.wfile.flush()
            self.first_sent.set()
            self.passes.acquire(timeout=60)
            self.rest_sent_at.append(time.monotonic())
            h.wfile.write(b"z" * (total - first))
        elif kind == "gzip":
            self.reply(h, action[1], gzip.compress(action[2], mtime=0),
                       {"Content-Encoding": "gzip"})
        else:
            super().act(h, action)

    def __exit__(self, *exc) -> None:
        for _ in range(100):  # nothing stays parked in a handler thread
            self.passes.release()
        super().__exit__(*exc)


def due_deliveries(store: Store, n: int, url: str, now: float = T0) -> int:
    """n deliveries due now (one `item.succeeded` event per item); the batch's seq."""
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": i} for i in range(n)],
                             now=now, max_attempts=1,
                             webhook=WebhookIn(url, events=["item.succeeded"]))
    claimed = store.items_claim("k", n, "o", now, 30.0)
    store.items_finish([Outcome(c.seq, c.batch_seq, c.token, "succeeded", b"1", None, 0.0)
                        for c in claimed], "o", now)
    return row.seq


def calls_of(store: Store, name: str, fail_first: Exception | None = None
             ) -> list[float]:
    """Record the monotonic time of every call of a store method (which raises
    `fail_first` on its first call, if given); the calls go through to the real one."""
    real, times = getattr(store, name), []

    def spy(*args, **kwargs):
        times.append(time.monotonic())
        if fail_first is not None and len(times) == 1:
            raise fail_first
        return real(*args, **kwargs)

    setattr(store, name, spy)
    return times


@contextlib.asynccontextmanager
async def sending(store: Store, clock: list[float], **options):
    """A Deliverer whose sends can run, and no loop: the test drives it a pass at a time.
    Its session is the one `run` makes."""
    options.setdefault("allow_private_webhooks", True)
    options.setdefault("poll_interval_s", 0.02)
    s = make_settings(db="unused.db", **options)
    d = Deliverer(store, s, lambda: clock[0])
    d.session = aiohttp.ClientSession(
        connector=connector(s.webhook_concurrency, s.webhook_per_host,
                            allow_private=s.allow_private_webhooks),
        timeout=aiohttp.ClientTimeout(total=s.webhook_timeout_s),
        auto_decompress=False, skip_auto_headers=("User-Agent",))
    async with anyio.create_task_group() as tg:
        await tg.start(d._hold_sends)
        try:
            yield d
        finally:
            await d.close()
            tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def loop_of(run: Callable):
    """Run one loop of the Deliverer; yields an Event set if the loop ever returns."""
    ended = anyio.Event()

    async def go() -> None:
        await run()
        ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        yield ended
        tg.cancel_scope.cancel()


def deliveries(store: Store, batch_seq: int):
    return store.deliveries_page(batch_seq, limit=100, after=None)[0]


# -- the destination guard, exactly ----------

TEREDO_PRIVATE_CLIENT = "2001:0:4136:e378:8000:63bf:f5ff:fffe"  # server 65.54.227.120
TEREDO_PRIVATE_SERVER = "2001:0:a00:1:8000:63bf:f7f7:f7f7"  # client 8.8.8.8


@pytest.mark.parametrize(("address", "reason"), [
    ("::1", "::1 is not a public address"),  # loopback, not an IPv4-compatible 0.0.0.1
    ("::", ":: is not a public address"),
    ("::2", "::2 embeds the refused IPv4 address 0.0.0.2"),
    ("64:ff9b::a00:1", "64:ff9b::a00:1 embeds the refused IPv4 address 10.0.0.1"),
    ("64:ff9b::a00:3", "64:ff9b::a00:3 embeds the refused IPv4 address 10.0.0.3"),
    # Teredo is (server, client): the client's address is the one that is reached
    (TEREDO_PRIVATE_CLIENT, f"{TEREDO_PRIVATE_CLIENT} embeds the refused IPv4 address 10.0.0.1"),
    (TEREDO_PRIVATE_SERVER, f"{TEREDO_PRIVATE_SERVER} is not a public address"),
    ("fe80::1%eth0", "fe80::1 is not a public address"),  # a scope id is not the address
    ("0.1.2.3", "0.1.2.3 is not a public address"),
])
def test_the_guard_names_the_reason_for_boundary_addresses(address, reason):
    assert blocked_reason(address) == reason


@pytest.mark.parametrize("address", [
    "1.0.0.1", "8.8.8.255", "9.255.0.0", "1.1.255.1", "2606:4700:4700::1111%eth0"])
def test_public_addresses_with_0_or_255_past_the_first_byte_or_a_scope_pass(address):
    assert blocked_reason(address) is None


@pytest.mark.parametrize(("host", "refused"), [
    ("localhost", True), ("LOCALHOST.", True), ("a.b.localhost", True),
    ("Api.LocalHost.", True), ("example.com", False), ("zzz.example", False),
    ("localhost.example", False), ("notlocalhost", False), ("a", False)])
def test_loopback_names_are_localhost_and_its_subdomains_only(host, refused):
    assert (blocked_name(host) is not None) is refused


def test_the_socket_factory_checks_the_address_it_is_given():
    public = guarded_socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 443)))
    public.close()
    for sockaddr, family in ((("127.0.0.1", 80), socket.AF_INET),
                             (("::1", 80, 0, 0), socket.AF_INET6)):
        with pytest.raises(BlockedDestination, match="refused destination"):
            guarded_socket((family, socket.SOCK_STREAM, 6, "", sockaddr))


async def test_the_resolver_passes_public_answers_and_tells_loopback_names_from_unknown():
    resolver = GuardedResolver()
    try:
        [answer] = await resolver.resolve("8.8.8.8")
        assert (answer["host"], answer["port"]) == ("8.8.8.8", 0)
        # a name that does not resolve: refused if it is a loopback name, else an OSError
        with pytest.raises(BlockedDestination):
            await resolver.resolve("minibatch-test.localhost.", 80)
        with pytest.raises(OSError):
            await resolver.resolve("minibatch-test.invalid", 80)
    finally:
        await resolver.close()


@pytest.mark.parametrize(("url", "expected"), [
    ("http://[::1", None),  # not a URL (yarl: ValueError), so not refused here
    ("http://h:99999/", None),
    ("http://8.8.8.8/hook", None),
    ("http://[2606:4700:4700::1111]:443/hook", None),
    ("http://[fe80::1%25eth0]:8080/hook", "refused destination: fe80::1 is not a public address"),
])
def test_literal_check_of_urls(url, expected):
    assert literal_blocked(url) == expected


async def test_a_connector_limits_requests_per_host_only_when_asked():
    """The http kind's connector gives no per-host limit: two requests to one host are
    in flight together."""
    with Gated(default=("gate",)) as rx:
        async with aiohttp.ClientSession(connector=connector(2, allow_private=True)) as session:

            async def post() -> None:
                async with session.post(rx.url, data=b"x") as resp:
                    await resp.read()

            async with anyio.create_task_group() as tg:
                tg.start_soon(post)
                tg.start_soon(post)
                await until(lambda: len(rx.requests) == 2)
                rx.let_one()
                rx.let_one()


# -- one response: read_capped, the read limit, the status range ----------


async def test_read_capped_stops_at_the_limit_and_reads_a_short_body_whole():
    with Gated([("body", 10), ("body", 11), ("body", 9)]) as rx:
        async with aiohttp.ClientSession() as session:
            got = []
            for _ in range(3):
                async with session.post(rx.url, data=b"x") as resp:
                    got.append(await read_capped(resp, 10))
    assert got == [b"b" * 10, b"b" * 10, b"b" * 9]


async def test_read_capped_asks_only_for_what_is_left_when_the_body_comes_in_parts():
    with Gated([("split", 5, 25)]) as rx:
        async with aiohttp.ClientSession() as session, session.post(rx.url, data=b"x") as resp:
            await until(lambda: resp.content.total_bytes >= 5)  # the first part is in
            result: list[bytes] = []

            async def read() -> None:
                result.append(await read_capped(resp, 10))

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)  # reads the 5 bytes there and waits for more
                rx.let_one()  # the other 20 arrive only after that
    assert result == [b"a" * 5 + b"z" * 5]


async def test_a_body_of_exactly_the_read_limit_is_read_whole_and_no_further(db_path):
    """64 KiB are read: the attempt waits for a 64 KiB body's last byte, and does not
    wait for the byte after it."""
    store, clock = open_store(db_path), [T0]
    with Gated([("split", LIMIT - 1, LIMIT), ("split", LIMIT, LIMIT + 1)]) as rx:
        async with sending(store, clock, webhook_timeout_s=10) as d:
            got: dict = {}

            async def post() -> None:
                got["result"] = await d.post(rx.url, "msg_1", b"{}", [])
                got["at"] = time.monotonic()

            async with anyio.create_task_group() as tg:
                tg.start_soon(post)
                await until(rx.first_sent.is_set)
                await anyio.sleep(0.5)  # room for a shorter read to end early
                rx.let_one()
            status, body, _, error, failure = got["result"]
            assert (status, error, failure) == (200, None, None)
            assert body == "a" * 1024
            assert got["at"] >= rx.rest_sent_at[0]  # it waited for the last byte

            status, _, _, error, failure = await d.post(rx.url, "msg_2", b"{}", [])
            assert (status, error, failure) == (200, None, None)  # the 65537th never came
            rx.let_one()
    store.close()


@pytest.mark.parametrize(("status", "failure"), [
    (201, None), (299, None), (300, "http_status"), (302, "http_status")])
async def test_2xx_alone_is_success(db_path, status, failure):
    store, clock = open_store(db_path), [T0]
    with Gated([status]) as rx:
        async with sending(store, clock) as d:
            got = await d.post(rx.url, "msg_1", b"{}", [])
    assert got[0] == status and got[4] == failure
    store.close()


async def test_a_client_error_is_a_connection_error_capped_at_500_chars_and_not_logged(
        db_path, caplog):
    store, clock = open_store(db_path), [T0]
    with Gated() as rx:
        async with sending(store, clock) as d:
            long_url = await d.post("http://h:99999/" + "x" * 600, "msg_1", b"{}", [])
            injected = await d.post(rx.url, "msg\r\nX-Evil: 1", b"{}", [])
    assert long_url[3].startswith("InvalidUrlClientError: http://h:99999/xxx")
    assert len(long_url[3]) == 500 and long_url[4] == "connection_error"
    assert injected[3].startswith("ValueError: ") and injected[4] == "connection_error"
    assert [r for r in caplog.records if r.name == "minibatch.delivery"] == []
    store.close()


def raising_session(exc: Exception) -> aiohttp.ClientSession:
    """A real session whose request-start hook raises `exc`: an error from deep inside
    the client, of whatever type."""
    async def boom(session, ctx, params) -> None:
        raise exc

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(boom)
    return aiohttp.ClientSession(trace_configs=[trace])


async def test_an_unexpected_error_is_that_attempts_failure_capped_and_logged(db_path, caplog):
    store, clock = open_store(db_path), [T0]
    async with sending(store, clock) as d:
        await d.session.close()
        d.session = raising_session(RuntimeError("y" * 600))
        surprise = await d.post("http://127.0.0.1:9/hook", "msg_1", b"{}", [])
        await d.session.close()
        d.session = raising_session(OSError("z" * 600))
        os_error = await d.post("http://127.0.0.1:9/hook", "msg_2", b"{}", [])
    assert surprise[3] == "RuntimeError: " + "y" * 486 and surprise[4] == "connection_error"
    assert os_error[3] == "OSError: " + "z" * 491 and os_error[4] == "connection_error"
    [logged] = [r for r in caplog.records if r.name == "minibatch.delivery"]
    assert logged.levelno == logging.ERROR and "msg_1 failed unexpectedly" in logged.getMessage()
    store.close()


# -- the Deliverer, a pass at a time ----------


async def test_slots_claims_never_exceed_the_free_slots_and_a_full_deliverer_asks_nothing(
        db_path):
    store, clock = open_store(db_path), [T0]
    with Gated(default=("gate",)) as rx:
        due_deliveries(store, 8, rx.url)
        claims = calls_of(store, "deliveries_claim")
        async with sending(store, clock, webhook_concurrency=4) as d:
            assert d.in_flight == 0
            assert await d.deliver_once() == 4
            assert d.in_flight == 4
            await until(lambda: len(rx.requests) == 4)
            assert await d.deliver_once() == 0
            assert len(claims) == 1  # no room: the store is not asked
            rx.let_one()
            await until(lambda: d.records)
            assert d.in_flight == 3
            assert await d.deliver_once() == 1
            assert d.in_flight == 4 and len(claims) == 2
            await until(lambda: len(rx.requests) == 5)
            assert await d.deliver_once() == 0 and len(claims) == 2
    store.close()


async def test_the_claimer_takes_a_freed_slot_at_once_not_at_its_next_poll(db_path):
    store, clock = open_store(db_path), [T0]
    with Gated(default=("gate",)) as rx:
        due_deliveries(store, 3, rx.url)
        async with (sending(store, clock, webhook_concurrency=2, poll_interval_s=120) as d,
                    loop_of(d.claimer)):
            await until(lambda: len(rx.requests) == 2)
            assert d.in_flight == 2
            rx.let_one()
            await until(lambda: len(rx.requests) == 3)  # its poll is a minute away
    store.close()


async def test_a_claimed_delivery_is_due_again_5_s_after_its_timeout(db_path):
    store, clock = open_store(db_path), [T0]
    with Gated() as rx:
        due_deliveries(store, 1, rx.url)
        async with sending(store, clock, webhook_timeout_s=10) as d:
            assert await d.deliver_once() == 1
            await until(lambda: d.records)  # attempted, not recorded: as if it died
            assert store.deliveries_claim(T0 + 15 - 0.001, 10, 30) == []
            assert len(store.deliveries_claim(T0 + 15, 10, 30)) == 1
    store.close()


async def test_an_attempts_time_is_measured_and_a_success_schedules_nothing(db_path):
    store, clock = open_store(db_path), [T0]
    with Gated([("hang", 0.3)]) as rx:
        due_deliveries(store, 1, rx.url)
        async with sending(store, clock) as d:
            started = time.perf_counter()
            assert await d.deliver_once() == 1
            await until(lambda: d.records)
            span_ms = (time.perf_counter() - started) * 1000
            [record] = d.records
    assert 299 <= record.response_time_ms <= span_ms  # the receiver took 0.3 s
    assert record.status_code == 200 and record.failure is None
    assert record.next_attempt_at is None and record.attempt_number == 1
    store.close()


async def test_after_close_nothing_is_claimed_or_sent(db_path):
    store, clock = open_store(db_path), [T0]
    with Gated() as rx:
        async with sending(store, clock) as d:
            await d.close()
            assert d.session.closed
            due_deliveries(store, 1, rx.url)
            assert await d.deliver_once() == 0
            assert len(store.deliveries_claim(T0, 10, 30)) == 1  # still due, unleased
    assert rx.requests == []
    store.close()


@pytest.mark.parametrize("failing", ["deliveries_record", "deliveries_claim"])
async def test_a_claim_pass_keeps_the_attempts_it_could_not_record_and_only_those(
        db_path, failing):
    """A claim pass records the attempts gathered first (a 410 among them ends other
    deliveries it must not send). If that write fails they are kept for the next pass;
    if only the claim after it fails they were written, and are not written again."""
    store, clock = open_store(db_path), [T0]
    with Gated() as rx:
        batch_seq = due_deliveries(store, 1, rx.url)
        async with sending(store, clock) as d:
            assert await d.deliver_once() == 1
            await until(lambda: d.records)
            writes = calls_of(store, "deliveries_record")
            calls_of(store, failing, StorageUnavailable("disk I/O error"))
            with pytest.raises(StorageUnavailable):
                await d.deliver_once()
            assert len(d.records) == (1 if failing == "deliveries_record" else 0)
            assert await d.deliver_once() == 0
            assert not d.records
    [delivery] = deliveries(store, batch_seq)
    assert delivery.status == "succeeded" and delivery.attempt_count == 1
    assert len(writes) == 1  # the attempt reached the store once (a failed write does not)
    store.close()


# -- the loops: errors, pauses ----------


def errors_logged(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_the_claimer_waits_out_storage_unavailable_quietly_and_goes_on(db_path, caplog):
    store, clock = open_store(db_path), [T0]
    with Gated() as rx:
        due_deliveries(store, 1, rx.url)
        claims = calls_of(store, "deliveries_claim", StorageUnavailable("disk I/O error"))
        async with sending(store, clock) as d, loop_of(d.claimer) as ended:
            await until(lambda: rx.requests or ended.is_set())
            assert not ended.is_set()
    assert claims[1] - claims[0] >= 1.0 - 1e-3  # a second's pause, not a spin
    assert errors_logged(caplog) == []
    store.close()


async def test_the_claimer_logs_an_unexpected_error_and_goes_on(db_path, caplog):
    store, clock = open_store(db_path), [T0]
    with Gated() as rx:
        due_deliveries(store, 1, rx.url)
        calls_of(store, "deliveries_claim", RuntimeError("claim failed once"))
        async with sending(store, clock) as d, loop_of(d.claimer) as ended:
            await until(lambda: rx.requests or ended.is_set())
            assert not ended.is_set()
    [logged] = errors_logged(caplog)
    assert "webhook claimer" in logged.getMessage() and logged.exc_info[0] is RuntimeError
    store.close()


async def test_an_idle_claimer_polls_every_half_poll_interval(db_path):
    store, clock = open_store(db_path), [T0]
    claims = calls_of(store, "deliveries_claim")
    async with sending(store, clock, poll_interval_s=0.2) as d, loop_of(d.claimer):
        await until(lambda: len(claims) >= 4)
    gaps = [b - a for a, b in itertools.pairwise(claims)]
    assert min(gaps) >= 0.1 - 1e-3, gaps
    store.close()


@pytest.mark.parametrize(("error", "pause"), [
    (StorageUnavailable("disk I/O error"), 1.0), (RuntimeError("record failed once"), 0.5)])
async def test_the_recorder_keeps_attempts_through_a_failed_write(db_path, caplog, error, pause):
    store, clock = open_store(db_path), [T0]
    with Gated() as rx:
        batch_seq = due_deliveries(store, 1, rx.url)
        writes = calls_of(store, "deliveries_record", error)
        async with sending(store, clock) as d, loop_of(d.recorder) as ended:
            assert await d.deliver_once() == 1
            await until(lambda: len(writes) >= 2 or ended.is_set())
            assert not ended.is_set()
    [delivery] = deliveries(store, batch_seq)
    assert delivery.status == "succeeded" and delivery.attempt_count == 1
    assert writes[1] - writes[0] >= pause - 1e-3
    logged = errors_logged(caplog)
    if isinstance(error, StorageUnavailable):
        assert logged == []
    else:
        [record] = logged
        assert "attempt recorder" in record.getMessage()
    store.close()


async def test_run_stores_the_body_as_received_not_decompressed(db_path):
    store, clock = open_store(db_path), [T0]
    raw = b'{"error": "' + b"x" * 5000 + b'"}'
    with Gated([("gzip", 500, raw)]) as rx:
        batch_seq = due_deliveries(store, 1, rx.url)
        settings = make_settings(db=db_path, allow_private_webhooks=True, poll_interval_s=0.02)
        d = Deliverer(store, settings, lambda: clock[0])
        async with anyio.create_task_group() as tg:
            await d.run(tg)
            await until(lambda: deliveries(store, batch_seq)[0].attempt_count == 1)
            await d.close()
            tg.cancel_scope.cancel()
    [attempt] = deliveries(store, batch_seq)[0].attempts
    assert attempt.status_code == 500
    assert attempt.response_body == gzip.compress(raw, mtime=0)[:1024].decode(
        "utf-8", "replace").replace("\x00", "\ufffd")
    assert "xxxx" not in attempt.response_body
    store.close()
