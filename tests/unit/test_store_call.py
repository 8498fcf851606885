"""`Store.call`, the one way code on an event loop reaches the store: on SQLite the call
runs at once and never suspends (no new interleavings, no thread hop); on PostgreSQL it
runs in a worker thread, at most POOL_SIZE at once, so the loop goes on meanwhile."""

from __future__ import annotations

import threading

import anyio
import pytest

from minibatch.errors import InvalidInput
from minibatch.store import open_store
from tests.conftest import POSTGRES

pytestmark = pytest.mark.anyio


@pytest.mark.sqlite_only
def test_on_sqlite_a_call_runs_at_once_in_the_callers_thread(db_path):
    store = open_store(db_path)
    pending = store.call(threading.get_ident)
    with pytest.raises(StopIteration) as done:
        pending.send(None)  # finished on the first step: it never suspended
    assert done.value.value == threading.get_ident()
    store.close()


async def test_a_call_passes_its_arguments_and_raises_what_the_store_raises(db_path):
    store = open_store(db_path)
    row = await store.call(store.batch_insert, tenant="t", kind="k", items=[{"input": 1}],
                           now=1.0, max_attempts=3)
    assert (await store.call(store.batch_get, row.id)).id == row.id
    with pytest.raises(InvalidInput):
        await store.call(store.batch_insert, tenant="t", kind="k", items=[{"no": 1}],
                         now=1.0, max_attempts=3)
    store.close()


@pytest.mark.skipif(not POSTGRES, reason="PostgreSQL only (MINIBATCH_TEST_STORE=postgres)")
async def test_on_postgresql_calls_run_in_threads_at_most_a_pool_at_once(db_path):
    from minibatch.store.postgres import POOL_SIZE

    store = open_store(db_path)
    loop_thread, lock = threading.get_ident(), threading.Lock()
    running, most, threads = [0], [0], set()
    release = threading.Event()

    def held() -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            threads.add(threading.get_ident())
        release.wait(10)
        with lock:
            running[0] -= 1
        return store.counts()["items"].get("queued", 0)

    ticks = [0]
    async with anyio.create_task_group() as tg:
        for _ in range(POOL_SIZE + 4):
            tg.start_soon(store.call, held)
        with anyio.fail_after(10):
            while running[0] < POOL_SIZE:  # the loop goes on while the calls wait
                ticks[0] += 1
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)  # a thirteenth call would start now
        assert running[0] == POOL_SIZE
        release.set()
    assert most[0] == POOL_SIZE and ticks[0] > 0 and loop_thread not in threads
    store.close()
