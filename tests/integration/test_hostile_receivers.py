"""Hostile webhook receivers: each misbehaviour is one recorded failed attempt, then a
retry that succeeds; memory stays flat and items keep flowing."""

from __future__ import annotations

import time

import anyio
import pytest

import minibatch
from tests.receiver import Receiver

pytestmark = pytest.mark.anyio

CASES = [
    (("slowloris",), "timeout"),
    (("huge", 64 * 1024 * 1024), "http_status"),
    (("endless",), "timeout"),
    (("garbage",), "connection_error"),
    (("half",), "connection_error"),
    (("drop",), "connection_error"),
]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def make_mb(db_path: str) -> minibatch.Minibatch:
    mb = minibatch.Minibatch(db_path, allow_private_webhooks=True, webhook_timeout_s=0.5,
                             webhook_retry_schedule="0,0.05", poll_interval_s=0.02)

    @mb.handler("echo", concurrency=32)
    async def echo(item):
        await anyio.sleep(0)
        return item.input

    return mb


async def deliver_once(mb, url: str, items: int = 1):
    batch = await mb.submit("echo", [{"input": i} for i in range(items)],
                            webhook={"url": url})
    await mb.wait(batch.id, timeout=30)
    with anyio.fail_after(30):
        while (deliveries := await mb.deliveries(batch.id))[0].status == "pending":
            await anyio.sleep(0.02)
    return deliveries[0]


@pytest.mark.parametrize(("action", "reason"), CASES, ids=[c[0][0] for c in CASES])
async def test_each_misbehaviour_is_a_failed_attempt_then_a_retry(db_path, action, reason):
    mb = make_mb(db_path)
    with Receiver([action], default=200) as rx:
        async with mb:
            d = await deliver_once(mb, rx.url)
    mb.close()
    first, second = d.attempts
    assert d.status == "succeeded" and second.status_code == 200
    if reason == "http_status":
        assert first.status_code == 500 and len(first.response_body) == 1024
        assert first.error_message == "HTTP 500"
    elif reason == "timeout":
        assert first.status_code is None and first.response_time_ms >= 400
        assert first.error_message.startswith("no response within")
    else:  # connection_error: the client's own error, named
        assert first.status_code is None and first.error_message
        assert not first.error_message.startswith(("no response within", "HTTP "))


async def test_memory_stays_flat_and_items_flow_while_receivers_misbehave(db_path):
    mb = make_mb(db_path)
    hostile = [a for a, _ in CASES] * 4
    with Receiver(hostile * 4, default=200) as rx:
        async with mb:
            async def round_of_deliveries():
                async with anyio.create_task_group() as tg:
                    for _ in range(len(hostile)):
                        tg.start_soon(deliver_once, mb, rx.url)

            async def hostile_rounds_beside_items() -> tuple[minibatch.Batch, float]:
                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(round_of_deliveries)
                    tg.start_soon(round_of_deliveries)
                    batch = await mb.submit("echo", [{"input": i} for i in range(5000)])
                    batch = await mb.wait(batch.id, timeout=30)
                    elapsed = time.perf_counter() - started
                return batch, elapsed

            await hostile_rounds_beside_items()  # warm up allocators and the pool
            started = time.perf_counter()
            alone = await mb.wait((await mb.submit(
                "echo", [{"input": i} for i in range(5000)])).id, timeout=30)
            alone_s = time.perf_counter() - started  # this machine's pace, no receivers
            before = rss_mib()
            items, items_s = await hostile_rounds_beside_items()
            grown = rss_mib() - before
    mb.close()
    assert items.status == "completed" and items.metrics.succeeded == 5000
    assert alone.status == "completed"
    # 5,000 no-op items; hung receivers (0.5 s each, dozens of them) do not hold them up:
    # they take about as long as on their own, at whatever pace this machine has
    assert items_s < max(10 * alone_s, alone_s + 5), (items_s, alone_s)
    assert grown < 20, f"RSS grew {grown:.1f} MiB over {2 * len(hostile)} hostile deliveries"
