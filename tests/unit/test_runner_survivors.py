"""The runner's loops and their pieces, one at a time, pinned where mutation testing of
runner.py (bench/mutation.py) found that nothing else noticed a change.

As in test_loops_once.py, the runner's parts are driven directly over a real SQLite file
with an injected clock, or a real `Minibatch` runs and the test waits on observed state
with a generous deadline. Where a loop's cadence is the point, runner.py's `anyio` is a
stand-in whose `sleep` records the delay asked for (`Sleeps`); nothing asserts on time.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable

import anyio
import msgspec
import pytest

import minibatch
import minibatch.runner
from minibatch.config import make_settings
from minibatch.errors import StorageUnavailable, StoreBusy
from minibatch.handlers import Registry, cancelled_outcome
from minibatch.metrics import Histogram
from minibatch.runner import GroupScope, KindPool, Runner, _pid_alive
from minibatch.store import Outcome, Store, open_store

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0
LEASE = 30.0


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def yield_many(n: int = 50) -> None:
    """Let every ready task run, `n` times over, without letting time pass."""
    for _ in range(n):
        await anyio.sleep(0)


async def settle(runner: Runner, n: int = 50) -> None:
    """`yield_many`, and then, while one of the runner's store calls is under way (on
    PostgreSQL it runs in a thread, and takes time), wait for it and do so again: every
    pass a loop would make now has been made."""
    await yield_many(n)
    while runner._calls:
        await until(lambda: not runner._calls)
        await yield_many(n)


def build(db_path: str, clock: list[float], *, items: int = 1, concurrency: int = 4,
          fn: Callable | None = None, latency: Histogram | None = None,
          group: int | None = None, **settings) -> tuple[Store, Runner, KindPool, str]:
    """A runner over a real store, reading the test's clock, with kind `k` (registered,
    its pool in `runner.pools`; a group handler if `group`) and a batch of `items` items
    of it (if any)."""
    store = open_store(db_path)
    registry = Registry()
    default = (lambda items: [i.input for i in items]) if group else (lambda item: item.input)
    handler = registry.register("k", fn or default, concurrency=concurrency, timeout=None,
                                max_attempts=None, group=group)
    settings.setdefault("lease_s", LEASE)
    runner = Runner(store, registry, make_settings(db=db_path, **settings), lambda: clock[0],
                    latency or Histogram())
    pool = runner.pools["k"] = KindPool(handler)
    if not items:
        return store, runner, pool, ""
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": i} for i in range(items)],
                             now=clock[0], max_attempts=3)
    return store, runner, pool, row.id


def statuses(store: Store) -> dict[int, tuple[str, int]]:
    """Item seq -> (status, attempts)."""
    return {seq: (status, attempts) for seq, status, attempts in store.conn.execute(
        "SELECT seq, status, attempts FROM items")}


class Stop(Exception):
    """Raised from a recorded sleep to end the loop under test."""


class Sleeps:
    """Stands in for runner.py's `anyio`: `sleep` records each delay, calls `then` (which
    may raise Stop to end the loop), and yields once; everything else is anyio's."""

    def __init__(self, then: Callable[[float], None] | None = None) -> None:
        self.delays: list[float] = []
        self.then = then

    def __getattr__(self, name: str):
        return getattr(anyio, name)

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        if self.then is not None:
            self.then(delay)
        await anyio.sleep(0)


def stop(delay: float) -> None:
    raise Stop


# -- recover: a dead process's items, and only a dead one's ----------


def dead_pid(above: int | None = None, below: int | None = None) -> int | None:
    """A pid no process has: a reaped child's if it is on the wanted side (the kernel does
    not hand it out again before wrapping around), else the nearest free one found (None
    if there is none below)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    if (above is None or proc.pid > above) and (below is None or proc.pid < below):
        return proc.pid
    pids = range(above + 1, 1 << 22) if above is not None else range(below - 1, 1, -1)
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    return None


async def test_recover_takes_back_the_items_of_dead_processes_of_this_host_only(db_path):
    clock = [T0]
    store, runner, _, batch_id = build(db_path, clock, items=6, claim_size=1)
    host, me = socket.gethostname(), os.getpid()
    # Every signal at its default (not as inherited: nohup ignores SIGHUP), so that any
    # signal but 0 would end it.
    live = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                             "for s in signal.valid_signals():\n"
                             "    try: signal.signal(s, signal.SIG_DFL)\n"
                             "    except (OSError, ValueError): pass\n"
                             "time.sleep(60)"])
    try:
        owners = {
            "dead, a lower pid": (f"{host}:{dead_pid(below=me)}:abcd", "queued"),
            "dead, a higher pid": (f"{host}:{dead_pid(above=me)}:abcd", "queued"),
            "alive": (f"{host}:{live.pid}:abcd", "running"),
            "this process, another runner": (f"{host}:{me}:abcd", "running"),
            # other hosts' pids say nothing of this one's (names sorting before and after)
            "another host": (f"{host[:-1]}:{dead_pid()}:abcd", "running"),
            "yet another host": (f"{host}-2:{dead_pid()}:abcd", "running"),
        }
        if owners["dead, a lower pid"][0].endswith(":None:abcd"):  # every lower pid is taken
            del owners["dead, a lower pid"]
        seqs = {}
        for name, (owner, _) in owners.items():
            runner.owner = owner
            pool = KindPool(runner.registry.handlers["k"])
            assert await runner.claim_once(pool) == 1
            seqs[name] = pool.ready[0].seq
        recovering = Runner(store, runner.registry, runner.settings, lambda: clock[0],
                            Histogram())
        await recovering.recover()
        after = statuses(store)
        assert {name: after[seqs[name]] for name in owners} == {
            name: (status, 1) for name, (_, status) in owners.items()}
        # A live owner is asked with signal 0, which is no signal: it runs on.
        with pytest.raises(subprocess.TimeoutExpired):
            live.wait(timeout=0.5)
    finally:
        live.kill()
        live.wait()
    rescued = [r for r in store.items_page(batch_id, None, status="queued", limit=10,
                                           after=-1)[0] if r.attempts]
    assert [r.error.code for r in rescued] == ["lease_expired"] * (len(owners) - 4)
    store.close()


def test_a_process_that_may_not_be_signalled_is_alive(monkeypatch):
    real = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid == 4_000_000:  # another user's process, as root never sees one
            raise PermissionError(1, "Operation not permitted")
        real(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    assert _pid_alive(4_000_000)
    assert not _pid_alive(dead_pid())


# -- drain, notify, cancel_local ----------


async def test_drain_hands_back_items_not_started_and_stops_claiming(db_path):
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=3)
    assert await runner.claim_once(pool) == 3  # claimed, waiting in the deque: no worker runs
    with anyio.fail_after(10):
        await runner.drain(grace_s=0.5)
    assert not pool.ready and pool.in_flight == 0
    assert pool.wake.is_set()  # the claimer wakes to see it must stop
    assert set(statuses(store).values()) == {("queued", 0)}  # handed back, not counted
    assert await runner.claim_once(pool) == 0  # a late pass of the claimer takes nothing
    assert set(statuses(store).values()) == {("queued", 0)}
    store.close()


async def test_drain_looks_at_the_running_items_often(db_path, monkeypatch):
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock)
    pool.in_flight = 1  # as if a worker ran an item; it ends while drain waits

    def item_ends(delay: float) -> None:
        pool.in_flight = 0

    sleeps = Sleeps(item_ends)
    monkeypatch.setattr(minibatch.runner, "anyio", sleeps)
    await runner.drain(grace_s=30)
    assert len(sleeps.delays) == 1 and 0 < sleeps.delays[0] <= 0.05  # a stop is prompt
    store.close()


async def test_drain_hands_items_back_even_when_their_outcomes_cannot_be_written(
        db_path, caplog):
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=2)
    assert await runner.claim_once(pool) == 2
    done = pool.ready.popleft()
    runner.outcomes.append(Outcome(done.seq, done.batch_seq, done.token, "succeeded", b"1",
                                   None, 0.0))

    def unavailable(*args, **kwargs):
        raise StorageUnavailable("disk full")

    store.items_finish = unavailable
    with anyio.fail_after(10):
        await runner.drain(grace_s=0.5)  # the shutdown goes on, without that write
    assert set(statuses(store).values()) == {("queued", 0)}  # that item runs again
    assert "could not write 1 outcomes" in caplog.text
    store.close()


async def test_notify_wakes_the_claimer_of_that_kind_and_ignores_other_kinds(db_path):
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock)
    runner.notify("other")  # no such pool: nothing to wake, no error
    assert not pool.wake.is_set()
    runner.notify("k")
    assert pool.wake.is_set()
    store.close()


async def test_cancel_local_interrupts_only_the_running_items_of_that_batch(db_path):
    clock = [T0]
    store, runner, _, _ = build(db_path, clock)
    scopes = {seq: anyio.CancelScope() for seq in (999, 1000, 2000)}
    # Batch seqs as the store returns them: equal ints, not the same objects.
    for i, seq in enumerate(scopes):
        runner.running[i, 1] = (int(str(seq)), scopes[seq])
    runner.running[9, 1] = (int("1000"), None)  # a kind a cancel lets finish
    runner.cancel_local(int("1000"))
    assert {seq: s.cancel_called for seq, s in scopes.items()} == {
        999: False, 1000: True, 2000: False}
    assert runner.cancelled == {1000}
    store.close()


# -- the claimer and claim_once ----------


def count_calls(obj, name: str) -> list[int]:
    real, calls = getattr(obj, name), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


async def test_claim_once_takes_no_more_than_the_free_slots_and_nothing_when_stopping(
        db_path):
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=20, concurrency=2)
    room = pool.free
    pool.in_flight = 1
    assert pool.free == room - 1  # one slot per item claimed and not finished
    pool.in_flight = 0
    assert await runner.claim_once(pool) == room
    assert (pool.free, len(pool.ready)) == (0, room)
    calls = count_calls(store, "items_claim")
    assert await runner.claim_once(pool) == 0  # full: it claims nothing, and asks nothing
    assert calls[0] == 0
    pool.in_flight -= 1
    assert pool.free == 1
    runner.stopping = True
    assert await runner.claim_once(pool) == 0  # stopping: not one more, though a slot is free
    assert calls[0] == 0
    assert [s for s, _ in statuses(store).values()].count("queued") == 20 - room
    store.close()


@pytest.mark.parametrize("free", ["all", "one"])
async def test_an_idle_claimer_waits_for_a_wake_rather_than_asking_the_store_again(db_path,
                                                                                   free):
    clock = [T0]
    store, runner, pool, batch_id = build(db_path, clock, items=1, poll_interval_s=60)
    store.batch_cancel(batch_id, None, clock[0])  # nothing due
    if free == "one":
        pool.in_flight = pool.free - 1  # the other slots hold items claimed before
    calls = count_calls(store, "items_claim")
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.claimer, pool)
        await settle(runner)
        assert calls[0] == 1  # one pass found nothing; it waits (here, 60 s or a wake)
        store.batch_insert(tenant="t", kind="k", items=[{"input": 1}], now=clock[0],
                           max_attempts=3)
        runner.notify("k")
        await until(lambda: pool.ready)
        await settle(runner)
        assert calls[0] <= 3  # the claim, one more pass that found nothing; then it waits
        tg.cancel_scope.cancel()
    store.close()


async def test_a_claimer_capped_by_claim_size_claims_on_at_once_till_every_worker_has_one(
        db_path):
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=20, concurrency=4, claim_size=2,
                                   poll_interval_s=60)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.claimer, pool)
        await until(lambda: pool.in_flight >= 4)  # in claims of 2, without a 60 s poll
        tg.cancel_scope.cancel()
    store.close()


async def test_a_claimer_that_found_its_pool_full_claims_again_as_items_finish(db_path):
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=40, concurrency=2,
                                   poll_interval_s=60)
    assert await runner.claim_once(pool) > 0 and pool.free == 0  # no worker runs them
    claims, passes = count_calls(store, "items_claim"), count_calls(runner, "claim_once")
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.claimer, pool)
        await settle(runner)
        assert (passes[0], claims[0]) == (1, 0)  # it found the pool full; it waits
        while pool.ready and not claims[0]:  # the items finish, one at a time
            c = pool.ready.popleft()
            runner.running[c.seq, c.token] = (c.batch_seq, None)
            runner._finish(pool, c, cancelled_outcome(c))
            await settle(runner)
        assert claims[0]  # it claimed again, at once: not after the 60 s poll
        tg.cancel_scope.cancel()
    store.close()


@pytest.mark.parametrize("concurrency", [2, 300])  # 300: past the ints Python keeps one of
async def test_the_claimer_keeps_one_group_claimed_ahead_of_the_workers(db_path, concurrency):
    """The deque holds up to one kind's worth of claimed items beside the running ones:
    the claimer fills it, waits while items wait in it, and fills it again once it has
    run dry (in_flight back at the concurrency), not at each finished item."""
    c = concurrency
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=1, concurrency=c,
                                   poll_interval_s=60, claim_size=10 * c)
    passes = count_calls(runner, "claim_once")

    def submit(n: int) -> None:
        store.batch_insert(tenant="t", kind="k", items=[{"input": i} for i in range(n)],
                           now=clock[0], max_attempts=3)
        runner.notify("k")

    def finish_one() -> None:
        item = pool.ready.popleft()
        runner.running[item.seq, item.token] = (item.batch_seq, None)
        runner._finish(pool, item, cancelled_outcome(item))

    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.claimer, pool)
        await until(lambda: pool.in_flight == 1)
        await settle(runner)
        assert passes[0] == 2  # the claim, a pass that found nothing; then it waits
        submit(c - 1)  # up to the concurrency: the claimer goes on claiming
        await until(lambda: pool.in_flight == c)
        submit(c + 1)  # the deque fills, one item is left over
        await until(lambda: pool.in_flight == 2 * c)
        await settle(runner)
        settled = passes[0]
        submit(1)  # a wake, while items wait in the deque: the claimer waits on
        await settle(runner)
        for _ in range(c - 1):  # finished items, the deque not yet dry: it waits on
            finish_one()
            await settle(runner, 3)
        assert (passes[0], pool.in_flight) == (settled, c + 1)
        finish_one()  # the deque ran dry: it claims the two left at once
        await until(lambda: pool.in_flight == c + 2)
        tg.cancel_scope.cancel()
    store.close()


# -- workers and _finish ----------


async def test_a_claim_wakes_one_idle_worker_until_that_one_has_run():
    """Each woken worker wakes the next before it runs an item (`_drain`), so claims in
    between wake no one more: waking every worker per claim cost more than the items."""
    pool = KindPool(Registry().register("k", lambda item: None, concurrency=3, timeout=None,
                                        max_attempts=None))
    idle = pool.idle[:] = [anyio.Event() for _ in range(3)]
    pool.wake_one()
    pool.wake_one()  # another claim before the woken worker ran
    assert [e.is_set() for e in idle] == [False, False, True] and pool.waking
    pool.waking = False  # as that worker does when it runs
    pool.wake_one()
    assert [e.is_set() for e in idle] == [False, True, True]


async def test_items_claimed_together_run_on_as_many_workers(db_path):
    mb = minibatch.Minibatch(db_path, poll_interval_s=60)
    started, alone = [], []
    all_started = anyio.Event()

    @mb.handler("k", concurrency=3, max_attempts=1)
    async def together(item):
        started.append(item.input)
        if len(started) == 3:
            all_started.set()
        with anyio.move_on_after(5) as scope:
            await all_started.wait()
        alone.append(scope.cancelled_caught)

    async with mb:
        batch = await mb.submit("k", [{"input": i} for i in range(3)])  # one claim of 3
        done = await mb.wait(batch.id, timeout=30)
    mb.close()
    assert alone == [False] * 3 and done.metrics.succeeded == 3


async def test_a_full_pool_claims_the_next_items_while_one_item_runs_on(db_path):
    mb = minibatch.Minibatch(db_path, poll_interval_s=60)  # no poll comes to the rescue
    started, waited_out = [], []
    last = anyio.Event()

    @mb.handler("k", concurrency=2, max_attempts=1)
    async def slow_first(item):
        started.append(item.input)
        if len(started) == 1:  # runs on until every other item has started beside it
            with anyio.move_on_after(10) as scope:
                await last.wait()
            waited_out.append(scope.cancelled_caught)
        elif len(started) == 7:
            last.set()

    async with mb:
        batch = await mb.submit("k", [{"input": i} for i in range(7)])
        done = await mb.wait(batch.id, timeout=30)
    mb.close()
    assert waited_out == [False] and done.metrics.succeeded == 7


async def test_a_waiting_item_of_a_cancelled_or_expired_batch_never_starts(db_path):
    clock = [T0]
    ran = []

    async def record(item):
        ran.append(item.input)
        return item.input

    store, runner, pool, _ = build(db_path, clock, items=0, fn=record)
    batches = {name: store.batch_insert(tenant="t", kind="k", items=[{"input": name}],
                                        now=T0, max_attempts=3, expires_at=expires_at)
               for name, expires_at in (("cancelled", None), ("expired before", T0 + 5),
                                        ("expires now", T0 + 10), ("expires later", T0 + 11),
                                        ("never expires", None))}
    assert await runner.claim_once(pool) == 5  # all five wait in the deque
    store.batch_cancel(batches["cancelled"].id, None, T0)
    runner.cancel_local(batches["cancelled"].seq)
    clock[0] = T0 + 10
    await runner._drain(pool)  # one drain runs the deque dry
    assert not pool.ready and pool.in_flight == 0 and not runner.running
    assert sorted(ran) == ["expires later", "never expires"]
    by_batch = {o.batch_seq: o.status for o in runner.outcomes}
    assert {name: by_batch[b.seq] for name, b in batches.items()} == {
        "cancelled": "cancelled", "expired before": "expired", "expires now": "expired",
        "expires later": "succeeded", "never expires": "succeeded"}
    store.close()


async def test_cancelling_a_batch_interrupts_the_running_items_of_interruptible_kinds_only(
        db_path):
    mb = minibatch.Minibatch(db_path, poll_interval_s=0.02)
    started = {"soft": anyio.Event(), "firm": anyio.Event()}
    release, ended = anyio.Event(), []

    def kind(name: str, interruptible: bool) -> None:
        @mb.handler(name, interruptible=interruptible, max_attempts=1)
        async def run(item):
            started[name].set()
            with anyio.fail_after(10):
                await release.wait()
            ended.append(name)
            return "answer"

    kind("soft", True)
    kind("firm", False)
    async with mb:
        soft = await mb.submit("soft", [{"input": 1}])
        firm = await mb.submit("firm", [{"input": 1}])
        with anyio.fail_after(10):
            await started["soft"].wait()
            await started["firm"].wait()
        await mb.cancel(soft.id)
        await mb.cancel(firm.id)
        soft_done = await mb.wait(soft.id, timeout=10)  # interrupted: ends at once
        assert ended == []
        release.set()  # the other's request, already sent, gets its answer
        firm_done = await mb.wait(firm.id, timeout=10)
        [firm_result] = [r async for r in mb.results(firm.id)]
    mb.close()
    assert soft_done.status == "cancelled" and soft_done.metrics.cancelled == 1
    assert ended == ["firm"] and firm_result.output == "answer"
    assert firm_done.status == "cancelled" and firm_done.metrics.succeeded == 1


async def test_latency_is_the_time_from_claim_to_outcome_on_the_runners_clock(db_path):
    clock = [T0]

    async def takes_2_5_s(item):
        clock[0] += 2.5
        return item.input

    latency = Histogram()
    store, runner, pool, _ = build(db_path, clock, fn=takes_2_5_s, latency=latency)
    assert await runner.claim_once(pool) == 1
    await runner._drain(pool)
    assert latency.sum == 2.5
    assert latency.counts[latency.buckets.index(5.0)] == 1  # 1 s < 2.5 s <= 5 s
    assert [o.status for o in runner.outcomes] == ["succeeded"]
    store.close()


async def test_a_fault_in_finishing_an_item_is_raised_as_itself_once(db_path):
    class Broken(Histogram):
        def observe(self, value: float) -> None:
            raise RuntimeError("observe failed")

    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, latency=Broken())
    assert await runner.claim_once(pool) == 1
    with pytest.raises(RuntimeError, match="observe failed"):
        await runner._drain(pool)
    assert len(runner.outcomes) == 1 and not runner.running  # its outcome is kept, once
    store.close()


# -- group handlers ----------


async def test_groups_claimed_together_run_on_as_many_workers(db_path):
    """A worker that takes one group wakes the next for the rest of the deque, as for
    single items: a group kind's `concurrency` is its calls at once."""
    mb = minibatch.Minibatch(db_path, poll_interval_s=60)
    calls, alone = [], []
    both_started = anyio.Event()

    @mb.handler("g", group=2, concurrency=2, max_attempts=1)
    async def together(items):
        calls.append([i.input for i in items])
        if len(calls) == 2:
            both_started.set()
        with anyio.move_on_after(5) as scope:
            await both_started.wait()
        alone.append(scope.cancelled_caught)
        return [i.input for i in items]

    async with mb:
        batch = await mb.submit("g", [{"input": i} for i in range(4)])  # one claim of 4
        done = await mb.wait(batch.id, timeout=30)
    mb.close()
    assert alone == [False, False] and done.metrics.succeeded == 4
    assert sorted(len(c) for c in calls) == [2, 2]


async def test_a_cancel_does_not_touch_the_outcomes_of_a_group_kind_not_interruptible(
        db_path):
    """As for single items: the call was not interrupted, its requests were sent and
    answered, so the cancelled batch keeps the answers."""
    mb = minibatch.Minibatch(db_path, poll_interval_s=0.02)
    started, release = anyio.Event(), anyio.Event()

    @mb.handler("g", group=4, interruptible=False, max_attempts=1)
    async def firm(items):
        started.set()
        with anyio.fail_after(10):
            await release.wait()
        return [f"answer {i.input}" for i in items]

    async with mb:
        batch = await mb.submit("g", [{"input": i} for i in range(3)])
        with anyio.fail_after(10):
            await started.wait()
        await mb.cancel(batch.id)
        release.set()
        done = await mb.wait(batch.id, timeout=10)
        outputs = sorted(r.output for r in [r async for r in mb.results(batch.id)])
    mb.close()
    assert (done.status, done.metrics.succeeded, done.metrics.cancelled) == ("cancelled", 3, 0)
    assert outputs == ["answer 0", "answer 1", "answer 2"]


async def test_a_group_call_is_interrupted_once_every_batch_in_it_is_cancelled():
    """However many other batches were cancelled too."""
    for cancelled, interrupted in (({1}, False), ({1, 2}, True), ({1, 2, 3}, True)):
        scope = anyio.CancelScope()
        GroupScope(scope, {1, 2}, cancelled).cancel()
        assert scope.cancel_called == interrupted, cancelled


async def test_a_group_call_takes_items_of_one_timeout(db_path):
    """The call has one timeout: items whose batches set different ones go in different
    calls; those of two batches that set the same one (equal, not the same float) in one."""
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=0, group=8)
    for timeout, n in ((2.5, 3), (2.5, 2), (None, 2)):
        store.batch_insert(tenant="t", kind="k", items=[{"input": i} for i in range(n)],
                           now=T0, max_attempts=3, item_timeout_s=timeout)
    assert await runner.claim_once(pool) == 7
    groups = []
    while pool.ready:
        group, timeout = runner._take_group(pool)
        groups.append((len(group), timeout))
    assert groups == [(5, 2.5), (2, None)]
    store.close()


async def test_a_runner_fault_in_a_group_still_gives_each_item_of_it_one_outcome(db_path):
    """The fault (here the first item's latency sample) is raised, and the items it left
    without an outcome get the runner's internal error: none keeps its lease."""
    class BrokenOnce(Histogram):
        failed = False

        def observe(self, value: float) -> None:
            if not self.failed:
                self.failed = True
                raise RuntimeError("observe failed")
            super().observe(value)

    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=3, group=3, latency=BrokenOnce())
    assert await runner.claim_once(pool) == 3
    with pytest.raises(RuntimeError, match="observe failed"):
        await runner._drain_groups(pool)
    assert not runner.running and pool.in_flight == 0 and not pool.ready
    codes = [o.error and msgspec.json.decode(o.error)["code"] for o in runner.outcomes]
    assert codes == [None, "internal_error", "internal_error"]
    assert [o.status for o in runner.outcomes] == ["succeeded", "queued", "queued"]
    store.close()


# -- completer, heartbeat, rescuer ----------


async def test_writing_outcomes_wakes_the_claimer_of_their_kind_and_no_other(db_path):
    """A finished item frees a slot of its batch's cap and a retry may be due at once:
    the claimer of the kind written wakes (not a poll interval later); a kind with
    nothing written sleeps on (a wake would cost it a write transaction for nothing)."""
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=4)
    other = runner.pools["other"] = KindPool(runner.registry.register(
        "other", lambda item: None, concurrency=1, timeout=None, max_attempts=None))
    assert await runner.complete_once() == 0 and not pool.wake.is_set()  # nothing to write
    assert await runner.claim_once(pool) == 4
    retry, *others = [pool.ready.popleft() for _ in range(4)]
    for c, status in zip(others, ("succeeded", "failed", "cancelled"), strict=True):
        runner.running[c.seq, c.token] = (c.batch_seq, None)
        runner._finish(pool, c, Outcome(c.seq, c.batch_seq, c.token, status, b"1", None, 0.0))
    assert not pool.wake.is_set()  # not before the slots are free in the store
    assert await runner.complete_once() == 3 and pool.wake.is_set() and not other.wake.is_set()
    pool.wake = anyio.Event()
    c = retry
    runner.running[c.seq, c.token] = (c.batch_seq, None)
    runner._finish(pool, c, Outcome(c.seq, c.batch_seq, c.token, "queued", None,
                                    b'{"code":"retry","message":"again"}', clock[0]))
    assert await runner.complete_once() == 1
    assert pool.wake.is_set() and not other.wake.is_set()
    assert statuses(store)[c.seq] == ("queued", 1)
    store.close()


async def test_outcomes_whose_write_failed_still_wake_their_claimer_once_written(db_path):
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=1)
    assert await runner.claim_once(pool) == 1
    c = pool.ready.popleft()
    runner.running[c.seq, c.token] = (c.batch_seq, None)
    runner._finish(pool, c, Outcome(c.seq, c.batch_seq, c.token, "succeeded", b"1", None, 0.0))
    real = store.items_finish
    store.items_finish = lambda *a: (_ for _ in ()).throw(StorageUnavailable("full"))
    with pytest.raises(StorageUnavailable):
        await runner.complete_once()
    assert not pool.wake.is_set() and len(runner.outcomes) == 1
    store.items_finish = real
    assert await runner.complete_once() == 1 and pool.wake.is_set()
    store.close()


async def test_a_heartbeat_or_a_rescue_pass_extends_a_lease_by_one_lease(db_path):
    clock = [T0]
    store, here, pool, _ = build(db_path, clock, items=2, claim_size=1)
    there = Runner(store, here.registry, here.settings, lambda: clock[0], Histogram())
    for extend in (here.heartbeat_once, here.rescue_once):
        pool = KindPool(here.registry.handlers["k"])
        assert await here.claim_once(pool) == 1
        seq = pool.ready[0].seq
        clock[0] += 20
        await extend()
        [(until_,)] = store.conn.execute("SELECT lease_until FROM items WHERE seq=?", (seq,))
        assert until_ == clock[0] + LEASE
        clock[0] += LEASE + 1  # `here` died after that pass: its lease lapses
        assert await there.rescue_once() == 1
        assert statuses(store)[seq] == ("queued", 1)
    store.close()


async def test_the_heartbeat_beats_more_than_twice_a_lease(db_path, monkeypatch):
    clock = [T0]
    store, runner, _, _ = build(db_path, clock, lease_s=1.5)
    sleeps = Sleeps(stop)
    monkeypatch.setattr(minibatch.runner, "anyio", sleeps)
    with pytest.raises(Stop):
        await runner.heartbeat()
    [delay] = sleeps.delays
    # more than twice a lease, so a beat a little late still finds its lease; and never
    # a spin, however short the lease
    assert 0 < delay < 1.5 / 2
    store.close()


@pytest.mark.parametrize(("fault", "pause"), [
    (StoreBusy("locked"), minibatch.runner.BUSY_RETRY_S),
    (RuntimeError("a bad row"), minibatch.runner.LOOP_ERROR_PAUSE_S),
], ids=["busy", "error"])
async def test_a_failed_heartbeat_beats_again_at_once_if_busy_else_after_a_pause(
        db_path, monkeypatch, fault, pause):
    """Another process held the write lock: the beat is retried in a moment, not a third
    of a lease later (two busy beats in a row would be as good as a lapsed lease). Any
    other fault is logged, and the heartbeat beats on after a pause."""
    clock = [T0]
    store, runner, _, _ = build(db_path, clock, lease_s=3.0)
    real, busy = store.leases_extend, [fault]

    def extend(*args, **kwargs):
        if busy:
            raise busy.pop()
        return real(*args, **kwargs)

    store.leases_extend = extend
    beats = count_calls(runner, "heartbeat_once")
    sleeps = Sleeps()
    sleeps.then = lambda delay: stop(delay) if len(sleeps.delays) == 3 else None
    monkeypatch.setattr(minibatch.runner, "anyio", sleeps)
    with pytest.raises(Stop):
        await runner.heartbeat()
    # busy: that beat, then the one that landed; an error: the next beat comes a third
    # of a lease after the pause
    assert not busy and beats == [2 if isinstance(fault, StoreBusy) else 1]
    assert sleeps.delays == [1.0, pause, 1.0]
    store.close()


async def test_a_claimer_the_store_was_too_busy_for_claims_again_in_a_moment(
        db_path, monkeypatch):
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=3, poll_interval_s=60)
    real, busy = store.items_claim, [StoreBusy("locked")]

    def claim(*args, **kwargs):
        if busy:
            raise busy.pop()
        return real(*args, **kwargs)

    store.items_claim = claim
    sleeps = Sleeps()
    monkeypatch.setattr(minibatch.runner, "anyio", sleeps)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.claimer, pool)
        await until(lambda: pool.ready)
        tg.cancel_scope.cancel()
    assert len(pool.ready) == 3 and not busy
    assert sleeps.delays[0] == minibatch.runner.BUSY_RETRY_S
    store.close()


async def test_the_rescuer_passes_about_every_half_lease(db_path, monkeypatch):
    clock = [T0]
    store, runner, _, _ = build(db_path, clock, lease_s=1.5)
    sleeps = Sleeps(stop)
    monkeypatch.setattr(minibatch.runner, "anyio", sleeps)
    with pytest.raises(Stop):
        await runner.rescuer()
    [delay] = sleeps.delays
    # soon after a lease lapses, but not so often that each pass's write is waste
    assert 1.5 / 4 <= delay <= 1.5 / 2
    store.close()


def runner_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "minibatch.runner" and r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("loop", "method"), [
    ("heartbeat", "leases_extend"),
    ("rescuer", "items_rescue"),
    ("expirer", "batches_expire"),
    ("checkpointer", "checkpoint"),
])
async def test_a_loop_waits_out_a_storage_fault_quietly_and_goes_on(db_path, monkeypatch,
                                                                   caplog, loop, method):
    """A store that cannot be reached is expected (a full disk, a lock held too long): the
    loop tries again on its next pass, without an error and its traceback in the log."""
    clock = [T0]
    store, runner, _, _ = build(db_path, clock)
    calls = [0]

    def unavailable(*args, **kwargs):
        calls[0] += 1
        raise StorageUnavailable("disk gone")

    setattr(store, method, unavailable)

    def twice(delay: float) -> None:
        if calls[0] == 2:
            raise Stop

    monkeypatch.setattr(minibatch.runner, "anyio", Sleeps(twice))
    with pytest.raises(Stop):
        await getattr(runner, loop)()
    assert calls[0] == 2 and runner_errors(caplog) == []
    store.close()


async def test_a_failing_store_is_retried_after_a_pause_not_in_a_spin(db_path, monkeypatch,
                                                                      caplog):
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=3, poll_interval_s=60)
    real_claim, faults = store.items_claim, [2]

    def claim(*args, **kwargs):
        if faults[0]:
            faults[0] -= 1
            raise StorageUnavailable("disk gone")
        return real_claim(*args, **kwargs)

    def unavailable(*args, **kwargs):
        raise StorageUnavailable("disk gone")

    store.items_claim = claim
    store.items_finish = unavailable
    sleeps = Sleeps()
    monkeypatch.setattr(minibatch.runner, "anyio", sleeps)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.claimer, pool)
        await until(lambda: pool.ready)  # two failed passes, then the claim
        tg.cancel_scope.cancel()
    assert len(pool.ready) == 3 and faults == [0]
    assert sleeps.delays[:2] == [sleeps.delays[0]] * 2 and sleeps.delays[0] > 0
    sleeps.then = stop
    runner.outcomes.append(Outcome(1, 1, 1, "succeeded", b"1", None, 0.0))
    runner.outcome_ready.set()
    with pytest.raises(Stop):
        await runner.completer()
    assert len(runner.outcomes) == 1  # kept for the next try
    assert sleeps.delays[-1] > 0
    assert runner_errors(caplog) == []  # expected, and retried: not an error
    store.close()


async def test_the_expirer_passes_every_little_while_and_outlives_a_failing_pass(
        db_path, monkeypatch, caplog):
    clock = [T0]
    store, runner, _, _ = build(db_path, clock, items=0)
    row = store.batch_insert(tenant="t", kind="k", items=[{"input": 1}], now=T0,
                             max_attempts=3, expires_at=T0 + 5)
    real, faults = store.batches_expire, [StorageUnavailable("disk gone"), RuntimeError("x")]

    def expire(now: float) -> list[int]:
        if faults:
            raise faults.pop(0)
        return real(now)

    store.batches_expire = expire
    passes = count_calls(runner, "expire_once")

    def move_on(delay: float) -> None:
        clock[0] += 1
        if passes[0] == 6:
            raise Stop

    sleeps = Sleeps(move_on)
    monkeypatch.setattr(minibatch.runner, "anyio", sleeps)
    with pytest.raises(Stop):
        await runner.expirer()
    assert not faults and store.batch_get(row.id).status == "expired"
    intervals = [d for d in sleeps.delays if d != minibatch.runner.LOOP_ERROR_PAUSE_S]
    assert len(intervals) == 7 and all(0 < d <= 5 for d in intervals)
    [error] = runner_errors(caplog)  # the RuntimeError; the storage fault is no error
    assert error.startswith("expirer: a pass failed")
    store.close()


@pytest.mark.sqlite_only
async def test_the_checkpointer_turns_automatic_checkpoints_off_while_it_runs(
        db_path, monkeypatch):
    clock = [T0]
    store, runner, _, _ = build(db_path, clock)

    def wal_autocheckpoint() -> int:
        return store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]

    seen = []

    def look(delay: float) -> None:
        seen.append(wal_autocheckpoint())
        raise Stop

    monkeypatch.setattr(minibatch.runner, "anyio", Sleeps(look))
    assert wal_autocheckpoint() == 1000
    with pytest.raises(Stop):
        await runner.checkpointer()
    assert seen == [0] and wal_autocheckpoint() == 1000
    store.close()


async def test_the_expirer_ends_the_claimed_items_waiting_past_their_batchs_expiry(db_path):
    """Claimed, still in the deque behind busy workers: they end `expired` at the
    expiry, and not a moment before; other batches' items wait on."""
    clock = [T0]
    store, runner, pool, _ = build(db_path, clock, items=0)
    for expires_at in (T0 + 10, None):
        store.batch_insert(tenant="t", kind="k", items=[{"input": 1}, {"input": 2}], now=T0,
                           max_attempts=3, expires_at=expires_at)
    assert await runner.claim_once(pool) == 4
    clock[0] = T0 + 9.5
    await runner.expire_once()
    assert len(pool.ready) == 4 and not runner.outcomes
    clock[0] = T0 + 10
    await runner.expire_once()
    assert [c.expires_at for c in pool.ready] == [None, None] and pool.in_flight == 2
    assert [o.status for o in runner.outcomes] == ["expired", "expired"]
    assert not runner.running
    store.close()


async def test_a_cancel_made_elsewhere_reaches_items_waiting_in_the_deque(db_path):
    """Claimed but not started: the canceller asks about their batches too, so they end
    `cancelled` instead of starting (another process cancelled the batch)."""
    clock = [T0]
    store, runner, pool, batch_id = build(db_path, clock, items=2)
    assert await runner.claim_once(pool) == 2 and not runner.running
    elsewhere = open_store(db_path)
    elsewhere.batch_cancel(batch_id, None, clock[0])
    elsewhere.close()
    await runner.cancel_once()
    waiting = pool.ready[0]
    assert waiting.batch_seq in runner.cancelled
    assert runner._ended_before_start(waiting).status == "cancelled"
    store.close()
