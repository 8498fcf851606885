"""Handlers that take items in groups (`group=G`): `run_group` read directly, then real
`Minibatch` runs over a SQLite file for grouping, per-item outcomes, timeouts, retries,
cancel and leases. Waits are on observed state with generous deadlines."""

from __future__ import annotations

import anyio
import msgspec
import pytest

import minibatch
from minibatch.cli import build_instance
from minibatch.errors import Fail, InvalidInput, Retry
from minibatch.handlers import DECLARED, Handler, run_group
from minibatch.kinds import ECHO_GROUP
from minibatch.models import Item, ItemError
from minibatch.store import Claimed

pytestmark = pytest.mark.anyio
NOW = 1_000_000.0


def claims(n: int, attempt: int = 1) -> list[Claimed]:
    return [Claimed(Item(id=f"item_{i}", batch_id="batch_1", entry_id=None, index=i, input=i,
                         metadata=None, attempt=attempt), i, 1, 3, None, NOW, 7)
            for i in range(n)]


async def group_call(fn, n: int, timeout: float | None = None):
    handler = Handler("g", fn, concurrency=None, timeout=timeout, max_attempts=None, group=8)
    return await run_group(handler, claims(n), timeout, lambda: NOW, (1.0, 60.0))


def code(outcome) -> str:
    return msgspec.json.decode(outcome.error, type=ItemError).code


@pytest.mark.parametrize("group", [0, -1, True])
def test_a_group_size_that_is_not_a_positive_int_is_refused(group):
    with pytest.raises(InvalidInput, match="group"):
        Handler("g", lambda items: items, concurrency=None, timeout=None, max_attempts=None,
                group=group)


def test_a_group_kinds_capacity_is_its_calls_times_its_group():
    h = Handler("g", lambda items: items, concurrency=3, timeout=None, max_attempts=None,
                group=10)
    assert (h.concurrency, h.group, h.capacity) == (3, 10, 30)
    single = Handler("s", lambda item: item, concurrency=3, timeout=None, max_attempts=None)
    assert (single.group, single.capacity) == (None, 3)


async def test_each_entry_of_the_reply_is_its_items_outcome():
    async def fn(items: list[Item]) -> list:
        assert [i.index for i in items] == [0, 1, 2, 3, 4]
        return [{"x": 0}, Fail("bad row", code="bad_row"), Retry(after=7), ValueError("boom"),
                None]

    ok, failed, retry, broken, none = await group_call(fn, 5)
    assert (ok.status, ok.output) == ("succeeded", b'{"x":0}')
    assert (failed.status, code(failed)) == ("failed", "bad_row")
    assert (retry.status, code(retry), retry.run_at) == ("queued", "retry", NOW + 7)
    assert (broken.status, code(broken)) == ("queued", "exception")
    assert b"ValueError: boom" in broken.error
    assert (none.status, none.output) == ("succeeded", b"null")


@pytest.mark.parametrize("reply", [[1, 2], [1, 2, 3, 4], None, {"a": 1}, "abc"])
async def test_a_reply_that_is_not_one_entry_per_item_is_every_items_failed_attempt(reply):
    async def fn(items):
        return reply

    outcomes = await group_call(fn, 3)
    assert [o.status for o in outcomes] == ["queued"] * 3
    assert all(code(o) == "exception" and b"one per item" in o.error for o in outcomes)


async def test_what_the_call_raises_is_every_items():
    async def fails(items):
        raise Fail("all of them", code="nope")

    async def raises(items):
        raise KeyError("k")

    assert {(o.status, code(o)) for o in await group_call(fails, 3)} == {("failed", "nope")}
    assert {(o.status, code(o)) for o in await group_call(raises, 3)} == {
        ("queued", "exception")}


async def test_a_call_past_its_timeout_times_out_each_item():
    async def slow(items):
        await anyio.sleep(30)

    outcomes = await group_call(slow, 4, timeout=0.05)
    assert [(o.status, code(o)) for o in outcomes] == [("queued", "timeout")] * 4


async def test_a_sync_group_handler_runs_in_a_thread():
    outcomes = await group_call(lambda items: [i.input * 2 for i in items], 3)
    assert [o.output for o in outcomes] == [b"0", b"2", b"4"]


# -- through the runner ----------


async def test_items_reach_the_handler_in_groups_of_at_most_g_and_every_item_once(db_path):
    sizes: list[int] = []
    seen: list[int] = []
    mb = minibatch.Minibatch(db_path)

    @mb.handler("g", group=16, concurrency=2)
    async def g(items: list[Item]) -> list:
        sizes.append(len(items))
        seen.extend(i.input for i in items)
        await anyio.sleep(0)
        return [i.input * 10 for i in items]

    async with mb:
        batch = await mb.submit("g", ({"input": i} for i in range(500)))
        batch = await mb.wait(batch.id, timeout=30)
        results = [r async for r in mb.results(batch.id)]
    mb.close()
    assert batch.status == "completed" and batch.metrics.succeeded == 500
    assert sorted(seen) == list(range(500)) and max(sizes) == 16
    assert sum(s > 1 for s in sizes) > len(sizes) / 2  # mostly groups, not single items
    assert [r.output for r in sorted(results, key=lambda r: int(r.id[5:]))] == [
        i * 10 for i in range(500)]


async def test_per_item_outcomes_retries_and_failures_through_the_runner(db_path):
    mb = minibatch.Minibatch(db_path, retry_base_s=0.01, retry_cap_s=0.01)

    @mb.handler("g", group=10, max_attempts=3)
    async def g(items: list[Item]) -> list:
        out: list = []
        for i in items:
            if i.input == "fail":
                out.append(Fail("never"))
            elif i.input == "flaky" and i.attempt < 3:
                out.append(Retry(after=0))
            else:
                out.append({"ok": i.input, "attempt": i.attempt})
        return out

    async with mb:
        batch = await mb.submit("g", [{"input": "a"}, {"input": "fail"}, {"input": "flaky"}])
        batch = await mb.wait(batch.id, timeout=30)
        results = {r.entry_id or r.id: r async for r in mb.results(batch.id)}
    mb.close()
    assert (batch.metrics.succeeded, batch.metrics.failed) == (2, 1)
    by_input = {(r.output or {}).get("ok"): r for r in results.values() if r.output}
    assert by_input["flaky"].attempts == 3 and by_input["a"].attempts == 1
    assert [r.error.message for r in results.values() if r.status == "failed"] == ["never"]


async def test_cancelling_the_only_batch_of_a_running_group_interrupts_the_call(db_path):
    started = anyio.Event()
    mb = minibatch.Minibatch(db_path)

    @mb.handler("g", group=8)
    async def g(items: list[Item]) -> list:
        started.set()
        await anyio.sleep(60)
        return [1] * len(items)

    async with mb:
        batch = await mb.submit("g", [{"input": i} for i in range(5)])
        with anyio.fail_after(10):
            await started.wait()
        await mb.cancel(batch.id)
        batch = await mb.wait(batch.id, timeout=10)  # not 60 s: the call was interrupted
    mb.close()
    assert batch.status == "cancelled" and batch.metrics.cancelled == 5


async def test_a_group_with_items_of_two_batches_runs_on_when_one_is_cancelled(db_path):
    """The call is not interrupted while it carries another batch's items: those succeed,
    and the cancelled batch's items end `cancelled` when it returns."""
    release, started = anyio.Event(), anyio.Event()
    mb = minibatch.Minibatch(db_path, claim_size=10)

    @mb.handler("g", group=10, concurrency=1)
    async def g(items: list[Item]) -> list:
        started.set()
        await release.wait()
        return [i.input for i in items]

    # Both batches wait in the queue before the runner starts, which claims them together.
    a = await mb.submit("g", [{"input": i} for i in range(3)])
    b = await mb.submit("g", [{"input": i} for i in range(3)])
    async with mb:
        with anyio.fail_after(10):
            await started.wait()
        await mb.cancel(a.id)
        await anyio.sleep(0.05)  # a wrong interrupt would land now
        release.set()
        a, b = await mb.wait(a.id, timeout=10), await mb.wait(b.id, timeout=10)
    mb.close()
    assert (a.status, a.metrics.cancelled) == ("cancelled", 3)
    assert (b.status, b.metrics.succeeded) == ("completed", 3)


async def test_a_group_running_past_its_lease_is_not_started_twice(db_path):
    calls: list[list[int]] = []
    mb = minibatch.Minibatch(db_path, lease_s=0.3)

    @mb.handler("g", group=4, concurrency=1)
    async def g(items: list[Item]) -> list:
        calls.append([i.input for i in items])
        await anyio.sleep(1.0)  # over three leases: the heartbeat must keep them
        return [i.input for i in items]

    async with mb:
        batch = await mb.submit("g", [{"input": i} for i in range(4)])
        batch = await mb.wait(batch.id, timeout=30)
    mb.close()
    assert batch.metrics.succeeded == 4 and calls == [[0, 1, 2, 3]]


async def test_builtin_echo_takes_groups(db_path):
    mb = build_instance({"db": db_path})
    assert mb.registry.get("echo").group == ECHO_GROUP
    async with mb:
        batch = await mb.submit("echo", ({"input": {"n": i}} for i in range(1000)))
        batch = await mb.wait(batch.id, timeout=30)
        outputs = [r.output async for r in mb.results(batch.id)]
    mb.close()
    assert batch.metrics.succeeded == 1000
    assert sorted(o["n"] for o in outputs) == list(range(1000))


async def test_a_handlers_module_declares_a_group_kind(db_path, tmp_path, monkeypatch):
    (tmp_path / "group_handlers.py").write_text(
        "import minibatch\n\n"
        "@minibatch.handler('declared_group', group=5, concurrency=2)\n"
        "async def declared(items):\n"
        "    return [len(items)] * len(items)\n")
    monkeypatch.chdir(tmp_path)
    DECLARED.clear()
    try:
        mb = build_instance({"db": db_path, "handlers": "group_handlers"})
    finally:
        DECLARED.clear()
    assert mb.registry.get("declared_group").capacity == 10
    async with mb:
        batch = await mb.submit("declared_group", [{"input": i} for i in range(3)])
        batch = await mb.wait(batch.id, timeout=30)
        outputs = [r.output async for r in mb.results(batch.id)]
    mb.close()
    assert batch.metrics.succeeded == 3 and set(outputs) <= {1, 2, 3}
