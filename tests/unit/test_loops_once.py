"""The loops one pass at a time, under an injected clock, as River's `runOnce`: leases,
heartbeat and rescue, retry backoff, the webhook schedule and `Retry-After`.

Nothing here sleeps to let time pass: the clock is a list the test moves. Where the real
loops run (`async with mb`), the clock stands still between moves, so nothing falls due
behind the test's back, and each wait is on an observed state with a generous deadline.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable

import anyio
import pytest

import minibatch
from minibatch.config import make_settings
from minibatch.delivery import next_delay, retry_after_s
from minibatch.handlers import Registry, backoff
from minibatch.metrics import Histogram
from minibatch.runner import KindPool, Runner
from minibatch.store import Outcome, Store, open_store
from tests.receiver import Receiver

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0  # a whole second, so HTTP-dates (whole seconds) land exactly
LEASE = 30.0


async def until(condition: Callable[[], object], timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


def items_of(mb_or_store, batch_id: str) -> list[minibatch.models.ItemRecord]:
    store = getattr(mb_or_store, "store", mb_or_store)
    return store.items_page(batch_id, None, status=None, limit=1000, after=-1)[0]


def seconds_after(dt, t: float) -> float:
    return dt.timestamp() - t


# -- leases: heartbeat and rescue, two processes over one database ----------


def two_runners(db_path: str, clock: list[float], max_attempts: int = 3
                ) -> tuple[Store, Runner, Runner, KindPool, KindPool, str]:
    """Two runners (two owners, as two processes would be) over one database, reading
    the test's clock, and a batch of one item of kind `k`."""
    store = open_store(db_path)
    registry = Registry()
    handler = registry.register("k", lambda item: item.input, concurrency=4, timeout=None,
                                max_attempts=None)
    settings = make_settings(db=db_path, lease_s=LEASE)
    here = Runner(store, registry, settings, lambda: clock[0], Histogram())
    there = Runner(store, registry, settings, lambda: clock[0], Histogram())
    assert here.owner != there.owner
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": 1}], now=clock[0],
                             max_attempts=max_attempts)
    return store, here, there, KindPool(handler), KindPool(handler), row.id


async def test_the_heartbeat_keeps_a_long_attempt_from_another_processs_rescuer(db_path):
    clock = [T0]
    store, here, there, pool, _, batch_id = two_runners(db_path, clock)
    assert await here.claim_once(pool) == 1
    for _ in range(6):  # 6 heartbeats, 2/3 of a lease apart: 4 leases in all
        clock[0] += LEASE * 2 / 3
        await here.heartbeat_once()
        assert await there.rescue_once() == 0, "a live process's item was taken by another"
    [item] = items_of(store, batch_id)
    assert (item.status, item.attempts) == ("running", 1)
    store.close()


async def test_a_runner_starting_leases_its_kinds_for_one_lease(db_path):
    """recover() leases this process's kinds before it fails the kinds nobody serves:
    for one lease from now, as its items would be."""
    clock = [T0]
    store, here, _, _, _, batch_id = two_runners(db_path, clock)
    await here.recover()
    assert store.batches_fail_unknown_kinds(["other"], T0 + LEASE - 1) == []
    assert store.batches_fail_unknown_kinds(["other"], T0 + LEASE) == [batch_id]
    store.close()


async def test_a_runner_leases_its_kinds_on_each_beat_and_none_once_it_drains(db_path):
    clock = [T0]
    store, here, _, _, _, batch_id = two_runners(db_path, clock)
    await here.heartbeat_once()
    clock[0] += LEASE * 2 / 3
    await here.rescue_once()  # a beat: kind `k`'s lease now runs to 2/3 + 1 lease from T0
    clock[0] += LEASE * 2 / 3
    assert store.batches_fail_unknown_kinds(["other"], clock[0]) == []  # still served
    here.stopping = True  # draining: its beats lease no kind
    store.items_release(here.owner, clock[0])
    await here.heartbeat_once()
    await here.rescue_once()
    assert store.batches_fail_unknown_kinds(["other"], clock[0]) == [batch_id]
    store.close()


async def test_an_expired_lease_is_rescued_with_the_attempt_counted_and_the_late_outcome_dropped(
        db_path):
    clock = [T0]
    store, here, there, pool, there_pool, batch_id = two_runners(db_path, clock)
    assert await here.claim_once(pool) == 1
    first = pool.ready.popleft()
    clock[0] += LEASE - 1
    assert await there.rescue_once() == 0  # not expired yet
    clock[0] += 2  # `here` stopped beating: its lease has passed
    assert await there.rescue_once() == 1
    [item] = items_of(store, batch_id)
    assert (item.status, item.attempts, item.error.code) == ("queued", 1, "lease_expired")
    assert item.next_attempt_at is not None and seconds_after(item.next_attempt_at, clock[0]) == 0
    # The first run's outcome arrives late: its lease is gone, so it is not written.
    here.outcomes.append(Outcome(first.seq, first.batch_seq, first.token, "succeeded", b"1",
                                 None, 0.0))
    await here.complete_once()
    assert items_of(store, batch_id)[0].status == "queued"
    assert await there.claim_once(there_pool) == 1
    assert there_pool.ready[0].item.attempt == 2  # the lost attempt was counted
    store.close()


async def test_rescuing_the_last_attempt_fails_the_item_and_ends_the_batch(db_path):
    clock = [T0]
    store, here, there, pool, _, batch_id = two_runners(db_path, clock, max_attempts=1)
    assert await here.claim_once(pool) == 1
    clock[0] += LEASE + 1
    assert await there.rescue_once() == 1
    [item] = items_of(store, batch_id)
    assert (item.status, item.attempts, item.error.code) == ("failed", 1, "lease_expired")
    assert item.next_attempt_at is None
    batch = store.batch_get(batch_id)
    assert batch.status == "failed" and batch.metrics.failed == 1
    store.close()


# -- retry backoff ----------


def test_backoff_doubles_from_its_base_to_its_cap_with_20_percent_jitter():
    for attempt in range(1, 21):
        expected = min(60.0, 2.0 ** (attempt - 1))
        for _ in range(50):
            delay = backoff(attempt, 1.0, 60.0)
            assert 0.8 * expected - 1e-9 <= delay <= 1.2 * expected + 1e-9, (attempt, delay)


async def test_a_retry_is_due_one_backoff_after_the_injected_clock_capped(db_path):
    mb = minibatch.Minibatch(db_path, retry_base_s=10, retry_cap_s=12, poll_interval_s=0.02)
    clock = [T0]
    mb.now = lambda: clock[0]
    attempts: list[int] = []

    @mb.handler("flaky", max_attempts=4)
    async def flaky(item):
        attempts.append(item.attempt)
        raise RuntimeError("not yet")

    async with mb:
        batch = await mb.submit("flaky", [{"input": 1}])
        # the delay before attempt n+1: 10 s, then 20 s and 40 s, both capped at 12 s
        for n, uncapped in ((1, 10.0), (2, 20.0), (3, 40.0)):
            await until(lambda n=n: (it := items_of(mb, batch.id)[0]).attempts == n
                        and it.status == "queued")
            [item] = items_of(mb, batch.id)
            wait = seconds_after(item.next_attempt_at, clock[0])
            expected = min(12.0, uncapped)
            assert 0.8 * expected - 1e-6 <= wait <= 1.2 * expected + 1e-6, (n, wait)
            assert attempts == list(range(1, n + 1))  # the clock stands: nothing ran early
            clock[0] += wait + 0.01  # shown to the microsecond: a hair past it
        done = await mb.wait(batch.id, timeout=15)
    assert attempts == [1, 2, 3, 4] and done.status == "failed"
    mb.close()


# -- the webhook schedule and Retry-After ----------


def test_retry_after_is_read_against_the_injected_now_not_the_wall_clock():
    now = 1_000_000_000.0  # 2001: far from the wall clock
    assert retry_after_s(email.utils.formatdate(now + 600, usegmt=True), now) == 600
    assert retry_after_s(email.utils.formatdate(now - 600, usegmt=True), now) == 0
    assert retry_after_s(email.utils.formatdate(now + 3 * 86400, usegmt=True), now) == 86400
    assert retry_after_s("120", now) == 120
    for attempt, step in enumerate((5, 300, 1800, 7200, 18000, 36000, 36000), start=1):
        for _ in range(20):
            assert 0.8 * step <= next_delay(minibatch.config.DEFAULT_RETRY_SCHEDULE, attempt,
                                            0) <= 1.2 * step
            assert next_delay(minibatch.config.DEFAULT_RETRY_SCHEDULE, attempt,
                              1.5 * step) == 1.5 * step


async def test_webhook_attempts_follow_the_schedule_and_retry_after_from_the_injected_clock(
        db_path):
    t1, t2 = T0 + 10, T0 + 10 + 1000  # the second and third attempts, as the test moves on
    script = [500, ("retry_after", 503, email.utils.formatdate(t1 + 1000, usegmt=True)),
              ("retry_after", 429, "120"), 200]
    mb = minibatch.Minibatch(db_path, allow_private_webhooks=True, poll_interval_s=0.02)
    clock = [T0]
    mb.now = lambda: clock[0]

    @mb.handler("echo")
    async def echo(item):
        return item.input

    with Receiver(script) as rx:
        async with mb:
            batch = await mb.submit("echo", [{"input": 1}], webhook={"url": rx.url})
            await mb.wait(batch.id, timeout=15)

            async def after_attempt(n: int) -> minibatch.models.Delivery:
                async def recorded():
                    return (await mb.deliveries(batch.id))[0]
                with anyio.fail_after(15):
                    while (d := await recorded()).attempt_count < n:
                        await anyio.sleep(0.01)
                return d

            d = await after_attempt(1)  # the default schedule: the first attempt at once
            assert d.status == "pending" and d.max_attempts == 8
            assert 4 <= seconds_after(d.next_attempt_at, T0) <= 6  # 5 s +-20 %
            clock[0] = t1
            d = await after_attempt(2)  # 503, Retry-After: an HTTP-date 1000 s after t1
            assert seconds_after(d.next_attempt_at, t1) == 1000  # longer than 300 s +-20 %
            clock[0] = t2
            d = await after_attempt(3)  # 429, Retry-After: 120 s, shorter than 1800 s
            wait = seconds_after(d.next_attempt_at, t2)
            assert 1440 <= wait <= 2160
            t3 = clock[0] = t2 + wait + 0.01  # shown to the microsecond: a hair past it
            d = await after_attempt(4)
    assert d.status == "succeeded"
    assert [a.status_code for a in d.attempts] == [500, 503, 429, 200]
    assert [a.created_at.timestamp() for a in d.attempts] == pytest.approx([T0, t1, t2, t3])
    # webhook-timestamp is the time of each attempt, from the same clock
    assert [int(r["headers"]["webhook-timestamp"]) for r in rx.requests] == [
        int(T0), int(t1), int(t2), int(t3)]
    mb.close()


def test_a_delivery_left_sending_by_a_dead_process_is_due_again_after_its_lease(db_path):
    store = open_store(db_path, webhook_schedule=(0.0, 5.0))
    batch = store.batch_insert(tenant="t", kind="k", items=[{"input": 1}], now=T0,
                               max_attempts=1, webhook=minibatch.models.WebhookIn(
                                   "http://hooks.example/x"))
    store.items_claim("k", 1, "o", T0, LEASE)
    token = store.conn.execute("SELECT seq, lease_token FROM items").fetchone()
    store.items_finish([Outcome(token[0], batch.seq, token[1], "succeeded", b"1", None, 0.0)],
                       "o", T0)
    [claimed] = store.deliveries_claim(T0, 10, lease_s=20)
    assert store.deliveries_claim(T0 + 19, 10, lease_s=20) == []  # its attempt may be on
    [again] = store.deliveries_claim(T0 + 20, 10, lease_s=20)  # that process is gone
    assert again[1] == claimed[1] and again[5] == 0  # the same delivery, no attempt recorded
    store.close()


# -- expiry ----------


async def test_expiry_ends_items_not_started_and_the_batch_once_running_ones_finish(db_path):
    """`expires_after_s`: at its time, queued items end `expired` at once, a running one
    finishes (its outcome counts), and the batch ends `expired` with metrics that add up;
    a retry that comes back to the queue after the expiry ends `expired` too."""
    clock = [T0]
    store, here, _, pool, _, other = two_runners(db_path, clock)
    store.batch_cancel(other, None, clock[0])  # only the batch below has items to claim
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": i} for i in range(4)],
                             now=clock[0], max_attempts=3, expires_at=T0 + 60,
                             webhook=minibatch.models.WebhookIn("http://127.0.0.1:9/h"))
    await here.claim_once(pool)  # four items claimed: two will finish, one retries, one runs on
    first, second, third, fourth = [pool.ready.popleft() for _ in range(4)]
    store.items_finish([Outcome(first.seq, first.batch_seq, first.token, "succeeded", b"1",
                                None, 0.0)], here.owner, clock[0])
    store.items_release(here.owner, clock[0])  # the other three go back, not started
    batch = store.batch_get(row.id)
    assert (batch.metrics.queued, batch.metrics.succeeded) == (3, 1)

    clock[0] = T0 + 59.9
    assert await here.expire_once() == 0  # not yet
    pool.in_flight = 0  # the items were handed back above, not through a worker
    await here.claim_once(pool)
    running = [pool.ready.popleft() for _ in range(3)]
    store.items_finish([Outcome(running[0].seq, running[0].batch_seq, running[0].token,
                                "queued", None, b'{"code":"x","message":"y"}', T0 + 61)],
                       here.owner, clock[0])
    clock[0] = T0 + 60
    assert await here.expire_once() == 1
    batch = store.batch_get(row.id)
    assert batch.status == "running"  # two items still run
    assert (batch.metrics.expired, batch.metrics.running) == (1, 2)
    assert await here.expire_once() == 0  # once
    store.items_finish([Outcome(running[1].seq, running[1].batch_seq, running[1].token,
                                "succeeded", b"2", None, 0.0),
                        Outcome(running[2].seq, running[2].batch_seq, running[2].token,
                                "queued", None, b'{"code":"x","message":"y"}', T0 + 99)],
                       here.owner, clock[0])
    batch = store.batch_get(row.id)
    assert batch.status == "expired" and batch.lifecycle_status == "expired"
    m = batch.metrics
    assert (m.succeeded, m.expired, m.queued, m.running) == (2, 2, 0, 0)
    assert m.total == m.queued + m.running + m.succeeded + m.failed + m.cancelled + m.expired
    assert [i.status for i in items_of(store, row.id)].count("expired") == 2
    events = [d.event for d in store.deliveries_page(row.seq, limit=10, after=None)[0]]
    assert events == ["batch.expired"]
    del second, third, fourth


async def test_a_claimed_item_that_waited_past_its_batchs_expiry_or_cancel_never_starts(
        db_path):
    """The claimer takes a group ahead of the workers; an item still waiting in the deque
    when its batch expires, or is cancelled, ends so without its handler being called."""
    clock = [T0]
    store = open_store(db_path)
    registry = Registry()
    calls: list[int] = []
    handler = registry.register("k", lambda item: calls.append(item.input), concurrency=1,
                                timeout=None, max_attempts=None)
    runner = Runner(store, registry, make_settings(db=db_path), lambda: clock[0], Histogram())
    pool = KindPool(handler)
    expiring = store.batch_insert(tenant="t", kind="k", items=[{"input": 1}, {"input": 2}],
                                  now=T0, max_attempts=3, expires_at=T0 + 10)
    assert await runner.claim_once(pool) == 2  # one for the worker and one waiting: a group
    clock[0] = T0 + 10
    await runner._drain(pool)
    assert calls == []
    await runner.complete_once()
    batch = store.batch_get(expiring.id)
    assert (batch.status, batch.metrics.expired) == ("expired", 2)

    cancelled = store.batch_insert(tenant="t", kind="k", items=[{"input": 3}, {"input": 4}],
                                   now=clock[0], max_attempts=3)
    assert await runner.claim_once(pool) == 2
    store.batch_cancel(cancelled.id, None, clock[0])  # what Minibatch.cancel does
    runner.cancel_local(cancelled.seq)
    await runner._drain(pool)
    assert calls == []
    await runner.complete_once()
    batch = store.batch_get(cancelled.id)
    assert (batch.status, batch.metrics.cancelled) == ("cancelled", 2)
