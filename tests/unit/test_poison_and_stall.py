"""Hardening of the runner: a stored row msgspec cannot decode fails its item, not the
runner; an unexpected error in one pass of a loop is logged and the loop goes on; an event
loop that stalled past the lease does not start a second run of its own running item."""

from __future__ import annotations

import logging

import anyio
import httpx
import pytest

import minibatch
from minibatch.auth import create_tenant_key
from minibatch.models import WebhookIn
from minibatch.store import Store, open_store

T0 = 1_000_000.0
POISON = b"1e400"  # valid JSON, but a number msgspec refuses to decode (out of range)


def poison(store: Store, batch_id: str, entry_id: str, column: str = "input") -> None:
    """Write an undecodable value straight into a stored item, past all validation."""
    store.conn.execute(
        f"UPDATE items SET {column}=? WHERE entry_id=? AND batch=(SELECT seq FROM batches"
        " WHERE id=?)", (POISON, entry_id, batch_id))


async def until(condition, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


# -- a poison row ----------

pytestmark = pytest.mark.anyio


async def test_an_undecodable_stored_input_fails_its_item_and_the_batch_ends(mb):
    @mb.handler("echo")
    async def echo(item):
        return item.input

    batch = await mb.submit("echo", [{"input": i, "entry_id": f"e{i}"} for i in range(5)],
                            tenant="t")
    poison(mb.store, batch.id, "e2")
    async with mb:
        done = await mb.wait(batch.id, timeout=10)
        results = [r async for r in mb.results(batch.id)]
    assert done.status == "completed"
    assert (done.metrics.succeeded, done.metrics.failed) == (4, 1)
    bad = results[2]
    assert (bad.status, bad.error.code, bad.attempts, bad.output) == (
        "failed", "bad_input", 1, None)
    assert "stored input" in bad.error.message and "out of range" in bad.error.message
    assert [r.output for r in results if r.status == "succeeded"] == [0, 1, 3, 4]

    app = mb.asgi()
    key = create_tenant_key(mb.store, "t")["api_key"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test",
                                 headers={"authorization": f"Bearer {key}"}) as client:
        page = await client.get(f"/v1/batches/{batch.id}/items")
        lines = await client.get(f"/v1/batches/{batch.id}/results")
    assert page.status_code == 200
    shown = page.json()["data"][2]
    assert (shown["input"], shown["status"], shown["error"]["code"]) == (
        "1e400", "failed", "bad_input")  # the raw text, as a string
    assert lines.status_code == 200 and len(lines.text.splitlines()) == 5


def test_an_undecodable_metadata_fails_the_item_with_an_item_failed_event(db_path):
    store = open_store(db_path)
    row = store.batch_insert(
        tenant="t", kind="k", now=T0, max_attempts=3,
        items=[{"input": 1, "entry_id": "bad", "metadata": {"m": 1}}, {"input": 2}],
        webhook=WebhookIn(url="https://hooks.example/x", events=["item.failed"]))
    poison(store, row.id, "bad", column="metadata")
    claimed = store.items_claim("k", 10, "o", T0, lease_s=30)
    assert [c.item.input for c in claimed] == [2]  # the other item is handed out
    [record], _ = store.items_page(row.id, None, status="failed", limit=10, after=-1)
    assert (record.error.code, record.metadata, record.attempts) == ("bad_input", "1e400", 1)
    assert "stored metadata" in record.error.message
    batch = store.batch_get(row.id)
    assert (batch.metrics.running, batch.metrics.failed, batch.metrics.queued) == (1, 1, 0)
    [delivery] = store.deliveries_page(row.seq, limit=10, after=None)[0]
    assert delivery.event == "item.failed" and '"bad_input"' in delivery.payload_bytes


@pytest.mark.sqlite_only
def test_an_item_whose_every_stored_column_is_unreadable_still_shows(db_path):
    store = open_store(db_path)
    row = store.batch_insert(tenant="t", kind="k", now=T0, max_attempts=3,
                             items=[{"input": 1, "entry_id": "x"}])
    store.conn.execute("UPDATE items SET input=?, output=?, error=?, metadata=?",
                       (b"\xff\xfe", POISON, b'{"not": "an error"}', 7))
    [record], _ = store.items_page(row.id, None, status=None, limit=10, after=-1)
    assert (record.input, record.output, record.metadata) == ("\ufffd\ufffd", "1e400", "7")
    assert (record.error.code, record.error.message) == (
        "unreadable_error", '{"not": "an error"}')


# -- a loop survives one bad pass ----------


def fail_once(obj, name: str) -> list[int]:
    """Make `obj.name` raise RuntimeError on its first call only; returns a call count."""
    real, calls = getattr(obj, name), [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError(f"{name} failed once")
        return real(*args, **kwargs)

    setattr(obj, name, flaky)
    return calls


@pytest.mark.parametrize(("method", "loop"), [
    ("items_claim", "claimer of kind 'echo'"),
    ("items_finish", "completer"),
    ("batches_cancelling", "canceller|heartbeat"),  # both read it; the first to fail logs
    ("items_rescue", "rescuer"),
    ("checkpoint", "checkpointer"),
])
async def test_a_loop_survives_a_store_method_that_raises_once(db_path, caplog, method, loop):
    mb = minibatch.Minibatch(db_path, lease_s=0.3, poll_interval_s=0.02)

    @mb.handler("echo")
    async def echo(item):
        await anyio.sleep(0.01)
        return item.input

    try:
        async with mb:
            calls = fail_once(mb.store, method)  # after start-up, which calls some of them
            batch = await mb.submit("echo", [{"input": i} for i in range(20)])
            done = await mb.wait(batch.id, timeout=10)
            await until(lambda: calls[0] >= 2)  # the loop ran its pass again
    finally:
        mb.close()
    assert done.status == "completed" and done.metrics.succeeded == 20
    [record] = [r for r in caplog.records if r.name == "minibatch.runner"]
    assert record.levelno == logging.ERROR
    assert any(name in record.getMessage() for name in loop.split("|"))
    assert record.exc_info[0] is RuntimeError  # logged with its traceback


async def test_a_worker_survives_a_fault_of_the_runner_and_the_item_is_retried(
        mb, caplog, monkeypatch):
    import minibatch.runner

    calls = fail_once(minibatch.runner, "run_attempt")

    @mb.handler("echo")
    async def echo(item):
        return item.input

    async with mb:
        batch = await mb.submit("echo", [{"input": i} for i in range(3)])
        done = await mb.wait(batch.id, timeout=10)
        results = [r async for r in mb.results(batch.id)]
    monkeypatch.undo()
    assert calls[0] == 4 and done.status == "completed" and done.metrics.succeeded == 3
    assert sorted(r.attempts for r in results) == [1, 1, 2]  # the broken attempt counts
    [record] = [r for r in caplog.records if r.name == "minibatch.runner"]
    assert "worker of kind 'echo'" in record.getMessage() and record.exc_info


# -- a stalled event loop ----------


async def test_a_stall_past_the_lease_does_not_start_a_second_run_of_a_live_item(mb):
    """The issue: a 100 MiB upload held the event loop longer than the lease; when it
    resumed, the rescuer re-queued an item still running in this live process and it ran
    a second time. Here the clock jumps past the lease while the item runs."""
    clock = [T0]
    mb.now = lambda: clock[0]
    runs: list[int] = []
    release = anyio.Event()

    @mb.handler("slow")
    async def slow(item):
        runs.append(item.attempt)
        await release.wait()
        return "done"

    async with mb:
        batch = await mb.submit("slow", [{"input": 1}])
        await until(lambda: runs)
        clock[0] += mb.settings.lease_s + 10  # the loop stalled; no heartbeat ran meanwhile
        assert await mb.runner.rescue_once() == 0
        assert mb.store.items_rescue(clock[0]) == 0  # its lease was extended: another
        # process's rescuer, running now, would not take it either
        assert await mb.runner.claim_once(mb.runner.pools["slow"]) == 0  # nothing to run twice
        release.set()
        done = await mb.wait(batch.id, timeout=10)
        results = [r async for r in mb.results(batch.id)]
    assert runs == [1]
    assert done.status == "completed"
    assert [(r.status, r.output, r.attempts) for r in results] == [("succeeded", "done", 1)]


def test_rescue_skips_the_excepted_owners_expired_leases_only(db_path):
    store = open_store(db_path)
    store.batch_insert(tenant="t", kind="k", items=[{"input": i} for i in range(3)], now=T0,
                       max_attempts=3)
    store.items_claim("k", 1, "me", T0, lease_s=30)
    store.items_claim("k", 2, "other", T0, lease_s=30)
    assert store.items_rescue(T0 + 31, except_owner="me") == 2
    assert store.lease_owners() == ["me"]
    assert store.items_rescue(T0 + 31) == 1  # without it, every expired lease is taken
