"""`minibatch serve --workers N` and two embedded instances on one file, as real processes.

Every wait is on observed state (the batch, the process table, marker files) with a
generous deadline; leases are long (600 s) where the point is that nothing waits for one.
"""

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
from pathlib import Path

import anyio
import httpx
import pytest

import minibatch
from tests.serve import Served, cli

HANDLERS = textwrap.dedent("""
    import os, pathlib, anyio, minibatch

    MARKS = pathlib.Path(os.environ["MARKS"])

    @minibatch.handler("pid", concurrency=2)
    async def pid(item):
        mark = MARKS / f"{os.getpid()}-{item.index}-{item.attempt}"
        mark.touch()
        seconds = item.input.get("seconds", 0.05)
        if item.input.get("block_first") and item.attempt == 1:
            seconds = 600
        await anyio.sleep(seconds)
        mark.unlink()
        return {"pid": os.getpid(), "attempt": item.attempt}
""")


def until(condition: Callable[[], object], timeout: float = 60.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


def children(pid: int) -> set[int]:
    """The live processes whose parent is `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


class Workers:
    """serve --workers 2 with the `pid` kind, and a client for it."""

    def __init__(self, tmp_path: Path, *flags: str, lease_s: float = 600.0) -> None:
        (tmp_path / "pid_handlers.py").write_text(HANDLERS)
        self.marks = tmp_path / "marks"
        self.marks.mkdir()
        self.served = Served(tmp_path, "--workers", "2", "--handlers", "pid_handlers", *flags,
                             env={"MARKS": str(self.marks), "MINIBATCH_LEASE_S": str(lease_s),
                                  "PYTHONPATH": os.pathsep.join(sys.path)})
        self.http = httpx.Client(base_url=self.served.url, timeout=30, headers={
            "Authorization": f"Bearer {self.served.key['api_key']}"})
        self.workers = until(lambda: len(w := children(self.served.proc.pid)) == 2 and w,
                             what="two workers")

    def submit(self, items: list[dict], **fields) -> str:
        r = self.http.post("/v1/batches", json={"kind": "pid", "items": items, **fields})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def batch(self, batch_id: str) -> dict:
        return self.http.get(f"/v1/batches/{batch_id}").json()

    def wait(self, batch_id: str, timeout: float = 60.0) -> dict:
        return until(lambda: (b := self.batch(batch_id))["status"] in (
            "completed", "failed", "cancelled") and b, timeout, f"batch {batch_id} to end")

    def results(self, batch_id: str) -> list[dict]:
        r = self.http.get(f"/v1/batches/{batch_id}/results")
        return [json.loads(line) for line in r.text.splitlines()]

    def running_marks(self) -> list[tuple[int, int, int]]:
        return [tuple(int(p) for p in m.name.split("-")) for m in self.marks.iterdir()]

    def close(self) -> None:
        self.http.close()
        if self.served.proc.poll() is None:
            self.served.stop()


@pytest.fixture
def workers(tmp_path):
    w = Workers(tmp_path)
    yield w
    w.close()


def test_two_workers_share_a_batch_and_run_each_item_once(workers):
    batch_id = workers.submit([{"input": {}} for _ in range(200)])
    batch = workers.wait(batch_id)
    assert batch["status"] == "completed" and batch["metrics"]["succeeded"] == 200
    results = workers.results(batch_id)
    assert sorted(r["id"] for r in results) == sorted({r["id"] for r in results})
    assert len(results) == 200 and {r["attempts"] for r in results} == {1}
    pids = collections.Counter(r["output"]["pid"] for r in results)
    # Each worker holds 4 items of the kind at most (2 running, 2 waiting): both took some.
    assert set(pids) == workers.workers, pids
    assert workers.served.proc.pid not in pids  # the API's process runs no items


def test_a_cancel_reaches_the_running_items_of_every_worker(workers):
    # Each worker holds 4 items of the kind at most: 8 are spread over both.
    batch_id = workers.submit([{"input": {"seconds": 600}} for _ in range(8)])
    until(lambda: {p for p, _, _ in workers.running_marks()} == workers.workers,
          what="items running in both workers")
    assert workers.http.post(f"/v1/batches/{batch_id}/cancel").status_code == 200
    batch = workers.wait(batch_id, timeout=30)  # not 600 s: each worker interrupted its own
    assert batch["status"] == "cancelled" and batch["metrics"]["cancelled"] == 8


def test_kill_9_of_a_worker_loses_nothing_and_serve_starts_another(workers):
    """The killed worker's item runs again at once, not after its 600 s lease, in the
    worker serve started in its place or the other one, which went on meanwhile."""
    batch_id = workers.submit([{"input": {"block_first": True}}] +
                              [{"input": {"seconds": 0.2}} for _ in range(40)])
    victim = until(lambda: next((p for p, i, _ in workers.running_marks() if i == 0), None),
                   what="the blocking item to start")
    os.kill(victim, signal.SIGKILL)
    batch = workers.wait(batch_id, timeout=120)
    assert batch["status"] == "completed" and batch["metrics"]["succeeded"] == 41
    results = {r["entry_id"] or r["id"]: r for r in workers.results(batch_id)}
    assert len(results) == 41
    first = next(r for r in results.values() if r["output"]["attempt"] == 2)
    assert first["attempts"] == 2 and first["output"]["pid"] != victim
    now = until(lambda: len(w := children(workers.served.proc.pid)) == 2 and w,
                what="serve to start a worker again")
    assert victim not in now and len(now & workers.workers) == 1


def test_sigterm_drains_every_worker_and_serve_exits_0(workers, tmp_path):
    batch_id = workers.submit([{"input": {"seconds": 600}} for _ in range(8)])
    until(lambda: len(workers.running_marks()) == 4, what="items running in both workers")
    assert workers.served.stop() == 0
    assert not any(alive(pid) for pid in workers.workers)
    # Handed back to the queue (not left running under a dead lease), attempt not counted.
    restarted = Served(tmp_path)  # no handler for `pid` here: the rows are what matter
    r = httpx.get(f"{restarted.url}/v1/batches/{batch_id}",
                  headers={"Authorization": f"Bearer {workers.served.key['api_key']}"})
    assert r.json()["metrics"]["running"] == 0
    restarted.stop()


def test_workers_exit_by_themselves_when_serve_is_killed(workers):
    workers.submit([{"input": {"seconds": 600}} for _ in range(2)])
    workers.served.kill()
    until(lambda: not any(alive(pid) for pid in workers.workers), timeout=30,
          what="the orphaned workers to exit")


def test_workers_flag_and_variable_are_checked(tmp_path):
    bad = cli("serve", "--workers", "many", "--db", str(tmp_path / "x.db"))
    assert bad.returncode == 2 and "not a number of workers" in bad.stderr
    zero = cli("serve", "--db", str(tmp_path / "x.db"), env={"MINIBATCH_WORKERS": "0"})
    assert zero.returncode != 0 and "workers" in zero.stderr
    assert "Traceback" not in zero.stderr
    started_by_hand = cli("worker")
    assert started_by_hand.returncode != 0 and "serve --workers" in started_by_hand.stderr


EMBEDDED = textwrap.dedent("""
    import os, sys, anyio, minibatch

    async def main(path, role):
        mb = minibatch.Minibatch(path)

        @mb.handler("pid", concurrency=2)
        async def pid(item):
            await anyio.sleep(0.05)
            return os.getpid()

        async with mb:
            if role == "submit":
                batch = await mb.submit("pid", ({"input": i} for i in range(100)))
                print(batch.id, flush=True)
                batch = await mb.wait(batch.id, timeout=120)
                print(batch.status, flush=True)
            else:
                print("ready", flush=True)
                await anyio.to_thread.run_sync(sys.stdin.read)  # until the test closes it
        mb.close()

    anyio.run(main, sys.argv[1], sys.argv[2])
""")


def test_two_embedded_instances_in_two_processes_share_one_file(tmp_path):
    script = tmp_path / "embedded.py"
    script.write_text(EMBEDDED)
    db = str(tmp_path / "shared.db")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    helper = subprocess.Popen([sys.executable, str(script), db, "help"], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    with helper:
        assert helper.stdout.readline().strip() == "ready"
        submitter = subprocess.run([sys.executable, str(script), db, "submit"], env=env,
                                   capture_output=True, text=True, timeout=180)
        assert submitter.returncode == 0, submitter.stderr
        batch_id, status = submitter.stdout.split()
        assert status == "completed"
        helper.stdin.close()
        assert helper.wait(timeout=60) == 0
    mb = minibatch.Minibatch(db)

    async def outputs() -> list:
        return [(r.id, r.output, r.attempts) async for r in mb.results(batch_id)]

    try:
        rows = anyio.run(outputs)
    finally:
        mb.close()
    assert len(rows) == 100 and len({i for i, _, _ in rows}) == 100
    assert {a for _, _, a in rows} == {1}
    pids = {pid for _, pid, _ in rows}
    assert len(pids) == 2 and helper.pid in pids  # the helper and the submitter both ran some
