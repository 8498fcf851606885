"""A cap runs at its cap: a batch's `concurrency`, a kind's, and the webhook per-host limit
hand a freed slot to the next item (or delivery) at once, not a poll interval later.

Each test sets the poll interval to 60 s, so only a wake-up can keep the work going: with
the slot handed over at once the work ends in about (n / cap) x t; waiting a poll per slot
it would take many minutes. The deadlines are generous, so a slow machine passes, and the
concurrency seen is asserted to reach the cap and never pass it.
"""

from __future__ import annotations

import threading
import time

import anyio
import pytest

import minibatch
from tests.receiver import Receiver

pytestmark = pytest.mark.anyio

POLL_S = 60.0


class Gauge:
    """How many are running now, and the most seen at once."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def ten_ms_kind(mb: minibatch.Minibatch, gauge: Gauge, **limits) -> None:
    @mb.handler("ten_ms", **limits)
    async def ten_ms(item: minibatch.Item) -> int:
        gauge.enter()
        try:
            await anyio.sleep(0.01)
        finally:
            gauge.leave()
        return item.index


async def test_a_batch_capped_at_8_runs_400_items_of_10_ms_at_its_cap(db_path):
    gauge = Gauge()
    mb = minibatch.Minibatch(db_path, poll_interval_s=POLL_S)
    ten_ms_kind(mb, gauge, concurrency=64)
    async with mb:
        started = time.monotonic()
        batch = await mb.submit("ten_ms", ({"input": i} for i in range(400)), concurrency=8)
        batch = await mb.wait(batch.id, timeout=30)
        elapsed = time.monotonic() - started
    assert batch.status == "completed" and batch.metrics.succeeded == 400
    assert gauge.most == 8
    # 50 rounds of 10 ms: ~0.5 s at the cap; a poll per round would be 50 minutes.
    print(f"capped batch: 400 x 10 ms at concurrency 8 in {elapsed:.2f} s")
    mb.close()


async def test_a_kind_capped_at_8_runs_400_items_of_10_ms_at_its_cap(db_path):
    gauge = Gauge()
    mb = minibatch.Minibatch(db_path, poll_interval_s=POLL_S, claim_size=8)
    ten_ms_kind(mb, gauge, concurrency=8)
    async with mb:
        batch = await mb.submit("ten_ms", ({"input": i} for i in range(400)))
        batch = await mb.wait(batch.id, timeout=30)
    assert batch.status == "completed" and batch.metrics.succeeded == 400
    assert gauge.most == 8
    mb.close()


async def test_two_capped_batches_of_one_kind_each_run_at_their_own_cap(db_path):
    gauge = Gauge()
    mb = minibatch.Minibatch(db_path, poll_interval_s=POLL_S)
    ten_ms_kind(mb, gauge, concurrency=64)
    async with mb:
        a = await mb.submit("ten_ms", [{"input": i} for i in range(100)], concurrency=3)
        b = await mb.submit("ten_ms", [{"input": i} for i in range(100)], concurrency=5)
        a, b = await mb.wait(a.id, timeout=30), await mb.wait(b.id, timeout=30)
    assert (a.metrics.succeeded, b.metrics.succeeded) == (100, 100)
    assert gauge.most <= 8
    mb.close()


async def test_webhooks_to_one_host_run_at_the_per_host_limit(db_path):
    """20 deliveries due at once to one receiver that takes 0.1 s each, with
    `webhook_per_host=2`: two at a time, each freed connection taken at once."""
    first_delay = 1000.0
    setup = minibatch.Minibatch(db_path, allow_private_webhooks=True,
                                webhook_retry_schedule=(first_delay,))

    @setup.handler("noop")
    async def noop(item: minibatch.Item) -> None:
        return None

    inflight, most, lock = [0], [0], threading.Lock()

    class Slow(Receiver):
        def act(self, h, action):
            with lock:
                inflight[0] += 1
                most[0] = max(most[0], inflight[0])
            time.sleep(0.1)
            with lock:
                inflight[0] -= 1
            super().act(h, action)

    with Slow() as rx:
        async with setup:
            ids = [(await setup.submit("noop", [{"input": 1}], webhook={"url": rx.url})).id
                   for _ in range(20)]
            for batch_id in ids:
                await setup.wait(batch_id, timeout=30)
        setup.close()
        assert rx.requests == []  # every delivery is due 1000 s from now

        mb = minibatch.Minibatch(db_path, allow_private_webhooks=True, poll_interval_s=POLL_S,
                                 webhook_per_host=2, webhook_retry_schedule=(first_delay,))
        mb.now = lambda: time.time() + first_delay + 1  # they are all due now
        async with mb:
            with anyio.fail_after(30):  # the deliverer's next poll would be 30 s away
                while len(rx.requests) < 20:
                    await anyio.sleep(0.02)
        mb.close()
    assert most[0] == 2
