"""The runner end to end on a real SQLite file: states, retries, timeouts, cancel, limits."""

from __future__ import annotations

import itertools
import threading
import time

import anyio
import pytest

import minibatch

pytestmark = pytest.mark.anyio


def metrics_add_up(batch: minibatch.Batch) -> bool:
    m = batch.metrics
    return m.total == m.queued + m.running + m.succeeded + m.failed + m.cancelled


async def test_async_batch_completes_with_outputs_in_submission_order(mb):
    @mb.handler("double")
    async def double(item):
        return item.input * 2

    async with mb:
        batch = await mb.submit("double", [{"input": i, "entry_id": f"e{i}"} for i in range(50)])
        assert batch.status == "queued" and batch.metrics.queued == 50
        done = await mb.wait(batch.id, timeout=10)
        results = [r async for r in mb.results(batch.id)]
    assert done.status == "completed"
    assert done.metrics.succeeded == 50 and metrics_add_up(done)
    assert done.cancel_url is None and done.completed_at is not None
    assert [r.output for r in results] == [i * 2 for i in range(50)]
    assert [r.entry_id for r in results] == [f"e{i}" for i in range(50)]
    assert all(r.attempts == 1 and r.status == "succeeded" for r in results)


async def test_sync_handler_runs_in_a_thread(mb):
    loop_thread = threading.get_ident()
    threads = set()

    @mb.handler("sync")
    def work(item):
        threads.add(threading.get_ident())
        time.sleep(0.01)
        return {"n": item.input}

    async with mb:
        batch = await mb.submit("sync", [{"input": i} for i in range(8)])
        done = await mb.wait(batch.id, timeout=10)
    assert done.status == "completed" and done.metrics.succeeded == 8
    assert threads and loop_thread not in threads


async def test_batch_where_every_item_fails_is_failed_with_error_codes(mb):
    @mb.handler("boom", max_attempts=2)
    async def boom(item):
        raise ValueError("bad value")

    async with mb:
        batch = await mb.submit("boom", [{"input": 1}, {"input": 2}])
        done = await mb.wait(batch.id, timeout=10)
        results = [r async for r in mb.results(batch.id)]
    assert done.status == "failed" and done.metrics.failed == 2
    assert {r.error.code for r in results} == {"exception"}
    assert results[0].error.message == "ValueError: bad value"
    assert all(r.attempts == 2 for r in results)


async def test_fail_ends_at_once_and_retry_after_sets_the_delay(mb):
    seen: dict[str, list[float]] = {"fail": [], "retry": []}

    @mb.handler("k", max_attempts=5)
    async def handler(item):
        seen[item.input].append(time.monotonic())
        if item.input == "fail":
            raise minibatch.Fail("not today")
        if item.attempt < 3:
            raise minibatch.Retry(after=0.2)
        return "ok"

    async with mb:
        batch = await mb.submit("k", [{"input": "fail"}, {"input": "retry"}])
        done = await mb.wait(batch.id, timeout=10)
        results = [r async for r in mb.results(batch.id)]
    assert done.status == "completed"
    assert len(seen["fail"]) == 1 and results[0].status == "failed"
    assert results[0].error.code == "failed" and results[0].error.message == "not today"
    assert results[1].attempts == 3 and results[1].output == "ok"
    gaps = [b - a for a, b in itertools.pairwise(seen["retry"])]
    assert all(g >= 0.19 for g in gaps), gaps


async def test_exceptions_back_off_exponentially(db_path):
    mb = minibatch.Minibatch(db_path, retry_base_s=0.1, poll_interval_s=0.01)
    times: list[float] = []

    @mb.handler("flaky", max_attempts=4)
    async def flaky(item):
        times.append(time.monotonic())
        raise RuntimeError("again")

    async with mb:
        batch = await mb.submit("flaky", [{"input": None}])
        await mb.wait(batch.id, timeout=10)
    mb.close()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 4
    # about 0.1, 0.2, 0.4 s with +-20 % jitter: never shorter (the contract). How much
    # longer a busy machine makes a gap is not bounded here: the arithmetic is checked
    # exactly under an injected clock (test_loops_once's backoff tests).
    for gap, base in zip(gaps, (0.1, 0.2, 0.4), strict=True):
        assert base * 0.8 - 0.005 <= gap, gaps


async def test_timeout_is_a_failed_attempt_with_code_timeout(mb):
    @mb.handler("slow", timeout=0.05, max_attempts=2)
    async def slow(item):
        await anyio.sleep(10)

    async with mb:
        batch = await mb.submit("slow", [{"input": 1}])
        done = await mb.wait(batch.id, timeout=10)
        [result] = [r async for r in mb.results(batch.id)]
    assert done.status == "failed"
    assert result.error.code == "timeout" and result.attempts == 2


async def test_batch_item_timeout_overrides_the_handler(mb):
    @mb.handler("slow")
    async def slow(item):
        await anyio.sleep(10)

    async with mb:
        batch = await mb.submit("slow", [{"input": 1}], item_timeout_s=0.05, max_attempts=1)
        [result] = [r async for r in mb.results((await mb.wait(batch.id, timeout=10)).id)]
    assert result.error.code == "timeout" and result.attempts == 1


async def test_cancel_mid_run_interrupts_running_and_cancels_queued(mb):
    started = anyio.Event()

    @mb.handler("wait", concurrency=2)
    async def wait(item):
        started.set()
        await anyio.sleep(30)

    async with mb:
        batch = await mb.submit("wait", [{"input": i} for i in range(10)])
        await started.wait()
        cancelling = await mb.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        assert metrics_add_up(cancelling)
        done = await mb.wait(batch.id, timeout=10)
        results = [r async for r in mb.results(batch.id)]
        with pytest.raises(minibatch.MinibatchError):
            await mb.cancel(batch.id)
    assert done.status == "cancelled" and done.metrics.cancelled == 10
    assert len(results) == 10 and {r.status for r in results} == {"cancelled"}


async def test_cancel_waits_for_a_sync_handler_then_ends_cancelled(mb):
    entered, cancelled = threading.Event(), threading.Event()

    @mb.handler("sync", concurrency=1)
    def work(item):
        entered.set()
        cancelled.wait(10)  # still running when the cancel comes, however slow the machine
        return "finished"

    async with mb:
        batch = await mb.submit("sync", [{"input": 1}, {"input": 2}])
        while not entered.is_set():
            await anyio.sleep(0.01)
        await mb.cancel(batch.id)
        cancelled.set()
        done = await mb.wait(batch.id, timeout=10)
        statuses = [r.status async for r in mb.results(batch.id)]
    assert done.status == "cancelled" and statuses == ["cancelled", "cancelled"]


async def test_terminal_batch_never_changes(mb):
    @mb.handler("echo")
    async def echo(item):
        return item.input

    async with mb:
        batch = await mb.wait((await mb.submit("echo", [{"input": 1}])).id, timeout=10)
        with pytest.raises(minibatch.MinibatchError) as err:
            await mb.cancel(batch.id)
        after = await mb.get(batch.id)
    assert err.value.status == 409
    assert after.status == "completed" and after.metrics == batch.metrics


async def test_per_kind_concurrency_limit_is_honoured(mb):
    in_flight = peak = 0

    @mb.handler("limited", concurrency=3)
    async def limited(item):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.01)
        in_flight -= 1

    async with mb:
        batch = await mb.submit("limited", [{"input": i} for i in range(40)])
        await mb.wait(batch.id, timeout=20)
    assert peak == 3


async def test_batch_concurrency_caps_its_own_items(mb):
    in_flight = peak = 0

    @mb.handler("wide", concurrency=20)
    async def wide(item):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.01)
        in_flight -= 1

    async with mb:
        batch = await mb.submit("wide", [{"input": i} for i in range(30)], concurrency=2)
        done = await mb.wait(batch.id, timeout=20)
    assert done.status == "completed" and peak == 2


async def test_ten_thousand_items_complete_and_metrics_add_up_at_every_poll(mb):
    @mb.handler("noop", concurrency=50)
    async def noop(item):
        await anyio.sleep(0)

    polls = []
    async with mb:
        batch = await mb.submit("noop", ({"input": i} for i in range(10_000)))
        while not batch.is_terminal:
            batch = await mb.get(batch.id)
            polls.append(batch)
            await anyio.sleep(0.005)
        count = 0
        async for _ in mb.results(batch.id):
            count += 1
    assert batch.status == "completed" and batch.metrics.succeeded == 10_000
    assert count == 10_000
    assert len(polls) > 1 and all(metrics_add_up(p) for p in polls)
    assert any(p.metrics.running or p.metrics.succeeded < 10_000 for p in polls)


@pytest.mark.parametrize(
    ("kind", "items", "field"),
    [
        ("nope", [{"input": 1}], "kind"),
        ("echo", [{"input": 1, "entry_id": "a"}, {"input": 2, "entry_id": "a"}],
         "items[1].entry_id"),
        ("echo", [{"input": 1}, {"input": object()}], "items[1].input"),
        ("echo", [], "items"),
        ("echo", [{"input": 1}, "not a dict"], "items[1]"),
        ("echo", [{"input": 1, "surprise": True}], "items[0]"),
    ],
    ids=["unknown-kind", "duplicate-entry-id", "not-json", "empty", "not-a-dict",
         "unknown-field"],
)
async def test_bad_submissions_raise_and_write_nothing(mb, kind, items, field):
    @mb.handler("echo")
    async def echo(item):
        return item.input

    with pytest.raises(minibatch.InvalidInput) as err:
        await mb.submit(kind, items)
    assert err.value.errors[0]["field"] == field
    assert await mb.list_batches() == []
    assert mb.store._one("SELECT count(*) FROM items")[0] == 0


async def test_bad_limits_and_webhook_url_are_refused(mb):
    @mb.handler("echo")
    async def echo(item):
        return item.input

    for kwargs in ({"max_attempts": 0}, {"concurrency": -1}, {"item_timeout_s": 0},
                   {"webhook": {"url": "ftp://example.com/x"}}):
        with pytest.raises(minibatch.InvalidInput):
            await mb.submit("echo", [{"input": 1}], **kwargs)
    assert await mb.list_batches() == []


async def test_list_batches_is_newest_first_with_a_status_filter(mb):
    @mb.handler("echo")
    async def echo(item):
        return item.input

    ids = [(await mb.submit("echo", [{"input": i}])).id for i in range(3)]
    assert [b.id for b in await mb.list_batches()] == ids[::-1]
    assert [b.id for b in await mb.list_batches(limit=2)] == ids[:0:-1]
    assert await mb.list_batches(status="completed") == []
    assert len(await mb.list_batches(status="queued")) == 3


async def test_stored_batch_of_a_kind_with_no_handler_fails_at_start(db_path):
    first = minibatch.Minibatch(db_path)
    first.handler("gone")(lambda item: None)
    batch = await first.submit("gone", [{"input": 1}, {"input": 2}])
    first.close()

    second = minibatch.Minibatch(db_path)
    async with second:
        done = await second.wait(batch.id, timeout=10)
        codes = {r.error.code async for r in second.results(batch.id)}
    second.close()
    assert done.status == "failed" and done.metrics.failed == 2
    assert codes == {"unknown_kind"}


async def test_an_instance_without_a_kind_leaves_it_to_the_instance_serving_it(db_path):
    """Two instances on one database with different handlers (two services, or a rolling
    deploy adding a kind): the one starting without `embed` must not fail the `embed`
    items queued behind the one running."""
    release = threading.Event()
    serving = minibatch.Minibatch(db_path)

    @serving.handler("embed", concurrency=1)
    def embed(item):
        release.wait(60)
        return item.input

    async with serving:
        batch = await serving.submit("embed", [{"input": i} for i in range(3)])
        deadline = time.monotonic() + 30
        while (await serving.get(batch.id)).metrics.running < 1:
            assert time.monotonic() < deadline
            await anyio.sleep(0.01)
        other = minibatch.Minibatch(db_path)
        other.handler("echo")(lambda item: item.input)
        async with other:
            assert (await other.get(batch.id)).metrics.failed == 0
        other.close()
        release.set()
        done = await serving.wait(batch.id, timeout=60)
    serving.close()
    assert (done.status, done.metrics.succeeded) == ("completed", 3)


async def test_an_instance_that_stopped_serves_its_kinds_no_more(db_path):
    """Its kinds' leases end with it (and its heartbeat, still beating while it drains,
    does not take them again), so a later instance without the handler fails them."""
    first = minibatch.Minibatch(db_path, lease_s=600)
    first.handler("gone")(lambda item: None)
    async with first:
        pass
    batch = await first.submit("gone", [{"input": 1}])
    first.close()
    second = minibatch.Minibatch(db_path)
    async with second:
        done = await second.wait(batch.id, timeout=60)
    second.close()
    assert (done.status, done.metrics.failed) == ("failed", 1)


async def test_leaving_the_context_hands_running_items_back(db_path):
    mb = minibatch.Minibatch(db_path, shutdown_grace_s=0.1)
    started = anyio.Event()

    @mb.handler("long", concurrency=2)
    async def long(item):
        started.set()
        await anyio.sleep(60)

    async with mb:
        batch = await mb.submit("long", [{"input": i} for i in range(3)])
        await started.wait()
    after = await mb.get(batch.id)
    items = mb.store.items_page(batch.id, None, status=None, limit=10, after=-1)[0]
    mb.close()
    assert after.metrics.queued == 3 and after.metrics.running == 0
    assert [i.attempts for i in items] == [0, 0, 0]  # handed back, not counted


def test_run_batch_sync_facade():
    batch, results = minibatch.run_batch(lambda item: item.input + 1,
                                         [{"input": i} for i in range(5)])
    assert batch.status == "completed"
    assert [r.output for r in results] == [1, 2, 3, 4, 5]


async def test_an_error_inside_the_context_propagates_as_itself(mb):
    @mb.handler("echo")
    async def echo(item):
        return item.input

    with pytest.raises(TimeoutError):
        async with mb:
            batch = await mb.submit("echo", [{"input": 1}])
            await mb.wait(batch.id, timeout=10)
            raise TimeoutError("from the body")


async def test_what_a_handler_raises_never_stops_the_runner(mb):
    """Found in review: a surrogate in a message, or Retry(after=nan/"5"), escaped
    run_attempt and took the whole task group down."""
    @mb.handler("odd", max_attempts=2)
    async def odd(item):
        if item.input == "surrogate-fail":
            raise minibatch.Fail("cannot read \udcff")
        if item.input == "surrogate-exc":
            raise ValueError("bad \udcff")
        if item.attempt == 1:
            raise minibatch.Retry(after=float("nan") if item.input == "nan" else "5")
        return "ok"

    async with mb:
        batch = await mb.submit("odd", [{"input": v} for v in
                                        ("surrogate-fail", "surrogate-exc", "nan", "str")])
        done = await mb.wait(batch.id, timeout=10)
        results = [r async for r in mb.results(batch.id)]
    assert done.status == "completed"
    assert [r.status for r in results] == ["failed", "failed", "succeeded", "succeeded"]
    assert results[0].error.message == "cannot read ?"


async def test_an_item_whose_lease_this_process_lost_runs_again_without_a_crash(mb):
    """Found in review: the same runner re-claimed its own item while the first run went
    on, and both runs shared one key in the runner's table of running items."""
    started, second_started, first_returns = anyio.Event(), anyio.Event(), anyio.Event()

    @mb.handler("slow", concurrency=2)
    async def slow(item):
        started.set()
        with anyio.fail_after(10):  # the runs wait on each other, not on the clock:
            if item.attempt == 1:  # the first goes on until the second has started,
                await second_started.wait()
                first_returns.set()
            else:  # and ends first, while the second still runs
                second_started.set()
                await first_returns.wait()
        return item.attempt

    async with mb:
        batch = await mb.submit("slow", [{"input": 1}])
        await started.wait()
        mb.store.leases_expire(mb.runner.owner)
        mb.store.items_rescue(mb.now())
        done = await mb.wait(batch.id, timeout=10)
        results = [r async for r in mb.results(batch.id)]
    assert done.status == "completed" and done.metrics.succeeded == 1
    assert [r.output for r in results] == [2]  # the first run's outcome was discarded


async def test_input_or_output_nested_too_deep_is_refused_not_a_crash(mb):
    """Found by the fuzz test: input ~990 levels deep decoded at submit but not in the
    runner, deeper in the stack, which crashed the task group."""
    import msgspec

    deep = msgspec.json.decode(b"[" * 300 + b"]" * 300)

    @mb.handler("nest")
    async def nest(item):
        return [[[[[]]]]] if item.input == "shallow" else deep

    with pytest.raises(minibatch.InvalidInput, match="nests deeper"):
        await mb.submit("nest", [{"input": deep}])
    async with mb:
        batch = await mb.submit("nest", [{"input": "shallow"}, {"input": "x"}])
        done = await mb.wait(batch.id, timeout=10)
        results = [r async for r in mb.results(batch.id)]
    assert done.status == "completed"
    assert results[1].status == "failed" and results[1].error.code == "output_not_json"


def test_too_deep_reads_strings_and_escapes():
    from minibatch.models import too_deep

    assert not too_deep(b'["' + b"[" * 500 + b'"]')
    assert not too_deep(b'["\\"' + b"[" * 500 + b'"]')
    assert too_deep(b"[" * 129 + b"]" * 129) and not too_deep(b"[" * 128 + b"]" * 128)
    assert not too_deep(b"[" + b"[1]," * 1000 + b"[1]]")
