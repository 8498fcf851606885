"""Deleting batches and files, retention, and a database that stops growing under churn.

The pruner is driven directly (`prune_once`, `doomed_prune`) where its cadence is not the
point; over HTTP, the wait for its one-second pass is on observed state, bounded.
"""

from __future__ import annotations

import os
import time

import anyio
import httpx
import pytest

import minibatch
from minibatch.auth import create_tenant_key
from minibatch.retention import Pruner
from minibatch.store import Store, open_store
from tests.conftest import ServerThread
from tests.receiver import Receiver

pytestmark = pytest.mark.anyio
DAY = 86400.0


def rows_of(store: Store, batch_seq: int) -> tuple[int, int, int]:
    one = store._one
    return (one("SELECT count(*) FROM items WHERE batch=?", (batch_seq,))[0],
            one("SELECT count(*) FROM deliveries WHERE batch=?", (batch_seq,))[0],
            one("SELECT count(*) FROM attempts WHERE delivery IN (SELECT seq FROM deliveries"
                " WHERE batch=?)", (batch_seq,))[0])


def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_delete_batch_over_http_is_409_while_it_runs_then_removes_everything(tmp_path):
    srv = ServerThread(str(tmp_path / "del.db"), webhook_retry_schedule="0").start()
    try:
        auth = {"Authorization": f"Bearer {srv.key('acme')}"}
        with Receiver() as rx:
            running = httpx.post(srv.url + "/v1/batches", headers=auth, json={
                "kind": "sleep", "items": [{"input": {"seconds": 600}}]}).json()["id"]
            done = httpx.post(srv.url + "/v1/batches", headers=auth, json={
                "kind": "echo", "items": [{"input": i} for i in range(300)],
                "webhook": {"url": rx.url}}).json()["id"]
            until(lambda: httpx.get(f"{srv.url}/v1/batches/{done}", headers=auth).json()[
                "deliveries"]["succeeded"] == 1)
        refused = httpx.delete(f"{srv.url}/v1/batches/{running}", headers=auth)
        assert refused.status_code == 409 and "cancel it first" in refused.json()["detail"]
        other = httpx.delete(f"{srv.url}/v1/batches/{done}",
                             headers={"Authorization": f"Bearer {srv.key('zeta')}"})
        assert other.status_code == 404  # another tenant's
        seq = srv.mb.store.batch_seq(done, None)
        assert rows_of(srv.mb.store, seq) == (300, 1, 1)
        deleted = httpx.delete(f"{srv.url}/v1/batches/{done}", headers=auth)
        assert deleted.status_code == 200 and deleted.json() == {
            "id": done, "object": "batch.deleted", "deleted": True}
        for path in ("", "/results", "/items", "/deliveries"):
            assert httpx.get(f"{srv.url}/v1/batches/{done}{path}",
                             headers=auth).status_code == 404
        assert httpx.delete(f"{srv.url}/v1/batches/{done}", headers=auth).status_code == 404
        until(lambda: rows_of(srv.mb.store, seq) == (0, 0, 0))  # the pruner's next pass
        assert httpx.get(f"{srv.url}/v1/batches/{running}", headers=auth).json()[
            "status"] == "running"
        assert srv.mb.store.check() == []
    finally:
        srv.stop()


def test_delete_file_over_http_and_its_lines_go_in_chunks(tmp_path):
    srv = ServerThread(str(tmp_path / "files.db")).start()
    try:
        auth = {"Authorization": f"Bearer {srv.key('acme')}"}
        data = b"".join(b'{"input": %d}\n' % i for i in range(500))
        file_id = httpx.post(srv.url + "/v1/files", headers={**auth, "content-type":
                             "application/jsonl"}, content=data).json()["id"]
        batch = httpx.post(srv.url + "/v1/batches", headers=auth, json={
            "kind": "echo", "input_file_id": file_id}).json()
        r = httpx.delete(f"{srv.url}/v1/files/{file_id}", headers=auth)
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert httpx.delete(f"{srv.url}/v1/files/{file_id}", headers=auth).status_code == 404
        again = httpx.post(srv.url + "/v1/batches", headers=auth, json={
            "kind": "echo", "input_file_id": file_id})
        assert again.status_code in (404, 422)
        one = srv.mb.store._one
        until(lambda: one("SELECT count(*) FROM file_lines WHERE file=?", (file_id,))[0] == 0)
        # The batch made from it keeps its items.
        until(lambda: httpx.get(f"{srv.url}/v1/batches/{batch['id']}",
                                headers=auth).json()["metrics"]["succeeded"] == 500)
    finally:
        srv.stop()


def test_doomed_rows_go_a_chunk_per_transaction(db_path):
    store = open_store(db_path)
    row = store.batch_insert(tenant="t", kind="k", now=0.0, max_attempts=3,
                             items=[{"input": i} for i in range(25)])
    store.conn.execute("UPDATE batches SET status='completed', completed_at=1 WHERE seq=?",
                       (row.seq,))
    store.conn.execute("UPDATE items SET status='succeeded'")
    store.conn.execute("UPDATE batches SET queued=0, succeeded=25")
    store.batch_delete(row.id, "t", 2.0)
    assert [store.doomed_prune(10) for _ in range(4)] == [10, 10, 6, 0]  # 5 + its doom
    assert rows_of(store, row.seq) == (0, 0, 0)
    store.close()


async def test_retention_deletes_batches_that_ended_before_the_window_only(db_path):
    clock = [1_000_000.0]
    mb = minibatch.Minibatch(db_path, retention_days=7)
    mb.now = lambda: clock[0]
    create_tenant_key(mb.store, "t")

    @mb.handler("k")
    async def k(item):
        return item.input

    async with mb:
        old = await mb.wait((await mb.submit("k", [{"input": 1}], tenant="t")).id)
        clock[0] += 6 * DAY
        recent = await mb.wait((await mb.submit("k", [{"input": 2}], tenant="t")).id)
        clock[0] += 2 * DAY  # old ended 8 days ago, recent 2
        pruner = Pruner(mb.store, mb.settings, mb.now)
        try:
            assert pruner.prune_once() == 1 + 1  # its item, then its doom row
        finally:
            pruner.close()
        ids = {b.id for b in await mb.list_batches(tenant="t")}
        assert ids == {recent.id} and old.id not in ids
    mb.close()


@pytest.mark.sqlite_only
async def test_the_file_stops_growing_under_steady_churn(db_path):
    """Submit, run and delete a 2,000-item batch, 30 times: freed pages are reused, so
    the file after round 30 is no bigger than after round 5 (plus a little)."""
    mb = minibatch.Minibatch(db_path)

    @mb.handler("k", group=100)
    async def k(items):
        return [{"echo": "x" * 100, "n": i.input} for i in items]

    sizes = []
    async with mb:
        pruner = Pruner(mb.store, mb.settings, mb.now)
        try:
            for _ in range(30):
                batch = await mb.submit("k", ({"input": i} for i in range(2000)))
                await mb.wait(batch.id, timeout=60)
                mb.store.batch_delete(batch.id, None, mb.now())
                pruner.prune_once()
                mb.store.checkpoint()
                sizes.append(os.path.getsize(db_path))
        finally:
            pruner.close()
    mb.close()
    print(f"size after rounds 1, 5, 10, 30: {sizes[0]:,} {sizes[4]:,} {sizes[9]:,}"
          f" {sizes[-1]:,} bytes")
    assert sizes[-1] <= sizes[4] * 1.1 + 64 * 1024, sizes


async def test_delivery_counts_for_metrics_follow_every_change_of_status(db_path):
    """Kept by triggers: inserted, claimed, retried, failed, redelivered and deleted, the
    counts /metrics reads equal a GROUP BY over the rows, and `check` agrees."""
    mb = minibatch.Minibatch(db_path, allow_private_webhooks=True,
                             webhook_retry_schedule=(0, 0.05))

    @mb.handler("k")
    async def k(item):
        return item.input

    def grouped() -> dict[str, int]:
        rows = mb.store.conn.execute("SELECT CASE status WHEN 'sending' THEN 'pending'"
                                     " ELSE status END, count(*) FROM deliveries GROUP BY 1")
        return dict(rows)

    def counted_and_grouped() -> tuple[dict[str, int], dict[str, int]]:
        """Both in one snapshot: the deliverer's writes (a worker thread's, on
        PostgreSQL) may commit between two reads."""
        with mb.store.conn:
            return mb.store.counts()["deliveries"], grouped()

    def assert_they_agree() -> None:
        counted, rows = counted_and_grouped()
        assert counted == rows

    with Receiver(default=500) as bad, Receiver() as good:
        async with mb:
            failing = await mb.submit("k", [{"input": 1}], webhook={"url": bad.url})
            ok = await mb.submit("k", [{"input": 2}], webhook={"url": good.url})
            with anyio.fail_after(30):
                while sum(grouped().get(s, 0) for s in ("succeeded", "failed")) < 2:
                    assert_they_agree()
                    await anyio.sleep(0.02)
            assert counted_and_grouped() == ({"succeeded": 1, "failed": 1},) * 2
            [failed] = [d for b in (failing, ok) for d in (await mb.deliveries(b.id))
                        if d.status == "failed"]
            await mb.redeliver(failed.id)
            assert_they_agree()
            mb.store.batch_delete(ok.id, None, mb.now())
            while mb.store.doomed_prune(1000):
                pass
            assert_they_agree()
            assert mb.store.check() == []
    mb.close()


def test_a_prune_under_load_loses_nothing_and_every_request_is_answered(tmp_path):
    """While the pruner removes a deleted 20,000-item batch, another batch runs and
    GETs keep coming: each GET is a 200, the running batch ends with every item, and the
    database's counters still add up."""
    srv = ServerThread(str(tmp_path / "load.db")).start()
    try:
        auth = {"Authorization": f"Bearer {srv.key('acme')}"}
        big = httpx.post(srv.url + "/v1/batches", headers=auth, timeout=60, json={
            "kind": "echo", "items": [{"input": i} for i in range(20000)]}).json()["id"]
        until(lambda: httpx.get(f"{srv.url}/v1/batches/{big}", headers=auth).json()[
            "status"] == "completed", timeout=120)
        running = httpx.post(srv.url + "/v1/batches", headers=auth, json={
            "kind": "sleep", "items": [{"input": {"seconds": 0.01}} for _ in range(2000)]}
                             ).json()["id"]
        seq = srv.mb.store.batch_seq(big, None)
        assert httpx.delete(f"{srv.url}/v1/batches/{big}", headers=auth).status_code == 200
        statuses, deadline = [], time.monotonic() + 120
        with httpx.Client(base_url=srv.url, headers=auth, timeout=30) as http:
            while rows_of(srv.mb.store, seq)[0] or http.get(
                    f"/v1/batches/{running}").json()["status"] != "completed":
                assert time.monotonic() < deadline
                statuses.append(http.get(f"/v1/batches/{running}").status_code)
        assert statuses and set(statuses) == {200}
        done = httpx.get(f"{srv.url}/v1/batches/{running}", headers=auth).json()
        assert done["metrics"]["succeeded"] == 2000
        assert srv.mb.store.check() == []
    finally:
        srv.stop()


def test_a_new_batch_never_takes_the_seq_of_a_deleted_batch_whose_rows_remain(db_path):
    """SQLite hands out the highest deleted rowid again: a batch submitted while the
    newest one's rows are still being removed must neither collide with them nor lose
    its own items to the pruner."""
    store = open_store(db_path)
    old = store.batch_insert(tenant="t", kind="k", now=0.0, max_attempts=1,
                             items=[{"input": i} for i in range(50)])
    store.conn.execute("UPDATE batches SET status='completed', completed_at=1")
    store.batch_delete(old.id, "t", 2.0)
    assert store.doomed_prune(10) == 10  # partly removed
    new = store.batch_insert(tenant="t", kind="k", now=3.0, max_attempts=1,
                             items=[{"input": i} for i in range(3)])
    assert new.seq != old.seq
    while store.doomed_prune(10):
        pass
    assert rows_of(store, new.seq)[0] == 3 and rows_of(store, old.seq) == (0, 0, 0)
    store.close()


async def test_a_deleted_batch_sends_nothing_more_and_its_delivery_cannot_be_redelivered(
        db_path):
    mb = minibatch.Minibatch(db_path, allow_private_webhooks=True,
                             webhook_retry_schedule=(0, 600))

    @mb.handler("k")
    async def k(item):
        return item.input

    with Receiver(default=500) as rx:
        async with mb:
            batch = await mb.submit("k", [{"input": 1}], webhook={"url": rx.url})
            with anyio.fail_after(30):
                while not rx.requests:  # the first attempt failed; the next is 600 s away
                    await anyio.sleep(0.02)
            [delivery] = await mb.deliveries(batch.id)
            mb.store.batch_delete(batch.id, None, mb.now())
            status = mb.store._one("SELECT status, failure_reason_code FROM deliveries"
                                   " WHERE id=?", (delivery.id,))
            assert tuple(status) == ("failed", "batch_deleted")
            with pytest.raises(minibatch.errors.NotFound):
                await mb.redeliver(delivery.id)
    mb.close()
