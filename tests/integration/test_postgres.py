"""What only PostgreSQL can show: three `minibatch serve` processes on one database
sharing a batch, a webhook sent once whichever process sends it, kill -9 of one process
mid-run, and migrations raced by processes starting together. Run with
MINIBATCH_TEST_STORE=postgres (`.ci/run` does); skipped otherwise.

Every wait is on observed state with a generous deadline."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import POSTGRES, database
from tests.receiver import Receiver
from tests.serve import Served

pytestmark = pytest.mark.skipif(not POSTGRES, reason="PostgreSQL only"
                                " (MINIBATCH_TEST_STORE=postgres)")

HANDLERS = textwrap.dedent("""
    import os, pathlib, anyio, minibatch

    MARKS = pathlib.Path(os.environ["MARKS"])

    @minibatch.handler("pid", concurrency=2)
    async def pid(item):
        mark = MARKS / f"{os.getpid()}-{item.index}-{item.attempt}"
        mark.touch()
        in_flight = len(list(MARKS.iterdir()))  # this item's, and every other one running
        seconds = item.input.get("seconds", 0.02)
        if item.input.get("block_first") and item.attempt == 1:
            seconds = 600
        while item.input.get("hold") and not (MARKS.parent / "release").exists():
            await anyio.sleep(0.02)  # held until the test lets the items go
        await anyio.sleep(seconds)
        mark.unlink()
        return {"pid": os.getpid(), "attempt": item.attempt, "in_flight": in_flight}
""")


def until(condition: Callable[[], object], timeout: float = 60.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


class Cluster:
    """Three `minibatch serve` processes on one PostgreSQL database, and a client."""

    def __init__(self, tmp_path, *flags: str, lease_s: float = 600.0) -> None:
        (tmp_path / "pid_handlers.py").write_text(HANDLERS)
        self.marks = tmp_path / "marks"
        self.marks.mkdir()
        self.db = database(tmp_path / "shared")
        env = {"MARKS": str(self.marks), "MINIBATCH_LEASE_S": str(lease_s),
               "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
        self.env = env
        self.nodes = []
        for n in range(3):
            (tmp_path / f"node{n}").mkdir()
            self.nodes.append(Served(tmp_path / f"node{n}", "--handlers", "pid_handlers",
                                     *flags, env=env, db=self.db))
        self.http = httpx.Client(base_url=self.nodes[0].url, timeout=30, headers={
            "Authorization": f"Bearer {self.nodes[0].key['api_key']}"})

    def submit(self, items: list[dict], **fields) -> str:
        answer = self.http.post("/v1/batches", json={"kind": "pid", "items": items, **fields})
        assert answer.status_code == 201, answer.text
        return answer.json()["id"]

    def wait(self, batch_id: str, timeout: float = 90.0) -> dict:
        return until(lambda: (b := self.http.get(f"/v1/batches/{batch_id}").json())["status"]
                     in ("completed", "failed", "cancelled") and b, timeout, f"{batch_id} ends")

    def results(self, batch_id: str) -> list[dict]:
        lines = self.http.get(f"/v1/batches/{batch_id}/results").text.splitlines()
        return [json.loads(line) for line in lines]

    def close(self) -> None:
        self.http.close()
        for node in self.nodes:
            if node.proc.poll() is None:
                node.stop()


@pytest.fixture
def cluster(tmp_path):
    made = Cluster(tmp_path)
    yield made
    made.close()


def test_three_processes_share_a_batch_and_run_each_item_once(cluster):
    batch_id = cluster.submit([{"input": {}} for _ in range(300)])
    batch = cluster.wait(batch_id)
    assert batch["status"] == "completed" and batch["metrics"]["succeeded"] == 300
    results = cluster.results(batch_id)
    assert len(results) == 300 and len({r["id"] for r in results}) == 300
    assert {r["attempts"] for r in results} == {1}
    pids = collections.Counter(r["output"]["pid"] for r in results)
    # One process runs 2 of the kind at a time: 300 items of 20 ms bring the others in.
    assert len(pids) >= 2, pids
    assert set(pids) <= {node.proc.pid for node in cluster.nodes}


def test_a_batch_cap_holds_across_the_three_processes(cluster):
    batch_id = cluster.submit([{"input": {"seconds": 0.05}} for _ in range(60)],
                              concurrency=3)
    batch = cluster.wait(batch_id)
    assert batch["status"] == "completed" and batch["metrics"]["succeeded"] == 60
    peak = max(r["output"]["in_flight"] for r in cluster.results(batch_id))
    assert 1 <= peak <= 3, peak


def test_a_webhook_is_one_delivery_row_whichever_process_sends_it(tmp_path):
    with Receiver(default=200) as receiver:
        nodes = Cluster(tmp_path, "--allow-private-webhooks")
        try:
            batch_id = nodes.submit([{"input": {}} for _ in range(30)],
                                    webhook={"url": receiver.url})
            nodes.wait(batch_id)
            until(lambda: receiver.requests, what="the webhook")
            deliveries = until(lambda: (d := nodes.http.get(
                f"/v1/batches/{batch_id}/deliveries").json()["data"]) and
                d[0]["status"] == "succeeded" and d, what="the delivery to succeed")
        finally:
            nodes.close()
    assert [d["event"] for d in deliveries] == ["batch.completed"]
    ids = {r["headers"]["webhook-id"] for r in receiver.requests}
    assert ids == {deliveries[0]["id"]}


def test_kill_9_of_one_process_loses_and_doubles_nothing(tmp_path):
    """What the killed process held runs again once its lease (3 s) lapses, in another
    process, and every item has one result."""
    nodes = Cluster(tmp_path, lease_s=3.0)
    try:
        batch_id = nodes.submit([{"input": {"block_first": True}}] +
                                [{"input": {"seconds": 0.05}} for _ in range(60)])
        victim = until(lambda: next((int(m.name.split("-")[0]) for m in nodes.marks.iterdir()
                                     if m.name.split("-")[1] == "0"), None),
                       what="the blocking item to start")
        os.kill(victim, signal.SIGKILL)
        nodes.http.base_url = next(n.url for n in nodes.nodes if n.proc.pid != victim)
        batch = nodes.wait(batch_id, timeout=120)
        results = nodes.results(batch_id)
    finally:
        nodes.close()
    assert batch["status"] == "completed" and batch["metrics"]["succeeded"] == 61
    assert len(results) == 61 and len({r["id"] for r in results}) == 61
    again = [r for r in results if r["attempts"] == 2]
    # What the victim held (2 running, 2 claimed, at most) ran again elsewhere, once.
    assert 1 <= len(again) <= 4 and {r["attempts"] for r in results} <= {1, 2}
    assert all(r["output"]["attempt"] == 2 and r["output"]["pid"] != victim for r in again)


def test_a_kill_9_loop_across_the_three_loses_and_doubles_nothing(tmp_path):
    """Three times, kill -9 a process that is running items and start it again on the
    same database, while the items are held (so the work outlasts the kills whatever the
    machine's speed); then let them go: every item ends with exactly one result, and the
    items the killed processes held ran again once their lease (2 s) lapsed."""
    nodes = Cluster(tmp_path, lease_s=2.0)
    kills = 0
    try:
        batch_id = nodes.submit([{"input": {"hold": True}} for _ in range(200)])
        while kills < 3:
            running = {int(m.name.split("-")[0]) for m in nodes.marks.iterdir()}
            victim = next((n for n in nodes.nodes if n.proc.pid in running), None)
            if victim is None:
                time.sleep(0.02)
                continue
            victim.kill()
            kills += 1
            spare = next(n for n in nodes.nodes if n.proc.poll() is None)
            nodes.http.base_url = spare.url
            index = nodes.nodes.index(victim)
            nodes.nodes[index] = Served(tmp_path / f"node{index}", "--handlers",
                                        "pid_handlers", env=nodes.env, db=nodes.db)
        (tmp_path / "release").touch()
        batch = nodes.wait(batch_id, timeout=180)
        results = nodes.results(batch_id)
    finally:
        nodes.close()
    assert batch["status"] == "completed" and batch["metrics"]["succeeded"] == 200
    assert len(results) == 200 and len({r["id"] for r in results}) == 200
    assert all(r["output"]["attempt"] == r["attempts"] for r in results)
    assert sum(r["attempts"] > 1 for r in results) >= kills  # one at least per kill


def test_migrations_raced_by_three_processes_run_once(tmp_path):
    url = database(tmp_path / "raced", empty=True)
    code = "import sys; from minibatch.store import open_store; open_store(sys.argv[1])"
    racers = [subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE)
              for _ in range(3)]
    errors = [p.communicate(timeout=60)[1].decode() for p in racers]
    assert [p.returncode for p in racers] == [0, 0, 0], errors
    from minibatch.store import open_store
    from minibatch.store.pg_schema import PG_MIGRATIONS

    store = open_store(url)
    assert store._all("SELECT version FROM minibatch_schema ORDER BY version") == [
        (n,) for n in range(1, len(PG_MIGRATIONS) + 1)]
    store.close()
